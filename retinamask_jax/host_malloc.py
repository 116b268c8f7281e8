"""How the entry points set up host memory for XLA:CPU's per-call buffers: tcmalloc where it is installed, else glibc's
large blocks on transparent huge pages.

XLA:CPU allocates every executable's temporary buffer (1.1 GB for the R-50 RetinaNet train step at 512 x 512, batch 1;
2.1 GB at batch 2) with `posix_memalign` at each call and frees it at the end. glibc serves a block that large from a
fresh `mmap` (an XLA worker thread's arena cannot hold more than 64 MB, so `MALLOC_MMAP_MAX_` and `M_MMAP_THRESHOLD`
do not keep it) and unmaps it when it is freed, so every step touches the whole buffer's pages for the first time:
- on 4 KiB pages that is hundreds of thousands of page faults per step;
- on a VM whose host takes back the guest's free memory (virtio-balloon free page reporting, e.g. Firecracker, the
  project's CI machines: `page_reporting.page_reporting_order` on the kernel command line), re-touching memory that
  the host has taken back costs ~1 ms per MB in the kernel, whatever the page size. A buffer freed at the end of one
  step and mapped again at the start of the next one is taken back when steps are long (~2 s, the reporting delay):
  every other R-50 batch-2 step then spends 1.8-2.2 s of system time re-faulting it (BENCHMARKS.md).

Two remedies, in order of preference, chosen by `reexec_with_host_malloc`:
1. gperftools' tcmalloc (`apt-get install libtcmalloc-minimal4` on Debian/Ubuntu), preloaded with `LD_PRELOAD` when
   the dynamic linker can find it: it keeps freed pages in its page heap and hands them to the next step, giving
   them back to the kernel only gradually, so a steady-state step takes almost no page faults (R-50 RetinaNet batch
   2: 73-931 faults and 0.01 s of system time per step; XLA's compilation is faster too). Its cost is resident
   memory: freed pages stay with the process.
2. glibc's tunable `glibc.malloc.hugetlb=1` (glibc >= 2.35; older ones ignore it): malloc marks its mmapped blocks
   for transparent huge pages, so the kernel maps them 2 MiB at a time: ~500x fewer faults and -16% on the R-50
   batch-1 train step on a machine without free page reporting. It acts where the kernel's THP mode is `madvise`
   (the common default) and is moot under `always`; under `never` nothing changes. It is set in both cases (tcmalloc
   leaves glibc's malloc unused, so it costs nothing there).

glibc reads tunables, and the dynamic linker `LD_PRELOAD`, once, when the process starts, so the entry points
(train.py, eval.py, predict.py, `python -m retinamask_jax.sweep` and the bench scripts) re-execute themselves once
with the environment changed; a process of your own sets it itself:
`LD_PRELOAD=libtcmalloc_minimal.so.4 GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py`.
`RETINAMASK_HUGEPAGE_MALLOC=0` turns the re-execution off; `RETINAMASK_TCMALLOC=0` keeps glibc's malloc (with the
tunable). An allocator already in `LD_PRELOAD` (tcmalloc, jemalloc, mimalloc) and a `glibc.malloc.hugetlb` value
already in `GLIBC_TUNABLES` are kept as they are.
"""

from __future__ import annotations

import ctypes.util
import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb=1'
OPT_OUT = 'RETINAMASK_HUGEPAGE_MALLOC'
TCMALLOC_OPT_OUT = 'RETINAMASK_TCMALLOC'
TCMALLOC_LIBRARIES = ('tcmalloc_minimal', 'tcmalloc')  # gperftools' library names, as ctypes.util.find_library takes
# A user's own allocator in LD_PRELOAD is left alone: whichever library comes first there provides malloc.
_ALLOCATORS = ('tcmalloc', 'jemalloc', 'mimalloc')
# gperftools prints a line for every allocation above this many bytes (1 GB by default): XLA's buffer, every step.
_TCMALLOC_REPORT = 'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'


def env_with_hugepage_malloc(env: Mapping[str, str]) -> dict[str, str]:
  """A copy of `env` whose GLIBC_TUNABLES also holds `TUNABLE`, unless it sets glibc.malloc.hugetlb already."""
  out = dict(env)
  tunables = out.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb=' not in tunables:
    out['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}' if tunables else TUNABLE
  return out


def preloaded_allocator(env: Mapping[str, str]) -> str | None:
  """The first malloc replacement (tcmalloc, jemalloc, mimalloc) named in env's LD_PRELOAD, None if there is none."""
  for entry in env.get('LD_PRELOAD', '').replace(':', ' ').split():
    name = os.path.basename(entry)
    if any(allocator in name for allocator in _ALLOCATORS):
      return entry
  return None


def find_tcmalloc() -> str | None:
  """The name the dynamic linker knows gperftools' tcmalloc by ('libtcmalloc_minimal.so.4'), None where it is not
  installed or `RETINAMASK_TCMALLOC=0`."""
  if os.environ.get(TCMALLOC_OPT_OUT, '1') == '0':
    return None
  for name in TCMALLOC_LIBRARIES:
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def env_with_host_malloc(env: Mapping[str, str], tcmalloc: str | None) -> dict[str, str]:
  """`env_with_hugepage_malloc(env)` with `tcmalloc` (a library name or path; None: none) put first in LD_PRELOAD,
  unless LD_PRELOAD names an allocator already."""
  out = env_with_hugepage_malloc(env)
  if tcmalloc and preloaded_allocator(out) is None:
    preload = out.get('LD_PRELOAD', '')
    out['LD_PRELOAD'] = f'{tcmalloc}:{preload}' if preload else tcmalloc
    out.setdefault(_TCMALLOC_REPORT, str(1 << 40))
  return out


def thp_mode() -> str | None:
  """The kernel's transparent huge page mode ('always', 'madvise' or 'never'), None where it cannot be read."""
  try:
    with open('/sys/kernel/mm/transparent_hugepage/enabled') as f:
      text = f.read()
  except OSError:
    return None
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else None


def applies() -> bool:
  """True where the tunable can act: Linux with glibc, and not turned off with RETINAMASK_HUGEPAGE_MALLOC=0."""
  return (sys.platform.startswith('linux') and os.environ.get(OPT_OUT, '1') != '0'
          and platform.libc_ver()[0] == 'glibc')


def reexec_with_host_malloc() -> None:
  """Re-executes this process (same interpreter, options and arguments, same PID) once, with tcmalloc preloaded
  where `find_tcmalloc()` finds it and `TUNABLE` in GLIBC_TUNABLES; returns without doing anything where both are in
  place already (or an allocator of the user's is preloaded) or `applies()` is False. Call it first thing in a
  `__main__` block, before any work whose effects would be lost."""
  if not applies():
    return
  tcmalloc = None if preloaded_allocator(os.environ) else find_tcmalloc()
  env = env_with_host_malloc(os.environ, tcmalloc)
  if env == dict(os.environ):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv keeps the interpreter's own options (-u, -X ..., -m module) that sys.argv drops.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

"""glibc's malloc set to back its large blocks with transparent huge pages, for XLA:CPU's per-call buffers.

XLA:CPU allocates every executable's temporary buffer (1.1 GB for the R-50 RetinaNet train step at 512 x 512) with
`posix_memalign` at each call and frees it at the end. glibc serves a block that large from a fresh `mmap` (an XLA
worker thread's arena cannot hold more than 64 MB, so `MALLOC_MMAP_MAX_` and `M_MMAP_THRESHOLD` do not keep it),
and the step then touches each of its 4 KiB pages for the first time: hundreds of thousands of page faults per step,
charged to whichever ops write the buffer first (the taps' slices, transposes and copies). With the tunable
`glibc.malloc.hugetlb=1` (glibc >= 2.35; older ones ignore it) malloc marks its mmapped blocks for transparent huge
pages, so the kernel maps them 2 MiB at a time: ~500x fewer faults, -16% on that train step on the project's
machine (BENCHMARKS.md). It only acts where the kernel's THP mode is `madvise` (the common default) and is moot
under `always`; under `never` nothing changes.

glibc reads tunables once, when the process starts, so the entry points (train.py, eval.py, predict.py,
`python -m retinamask_jax.sweep` and the bench scripts) re-execute themselves once with the tunable added to
`GLIBC_TUNABLES`; a process of your own sets it in its environment: `GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python
my_script.py`. `RETINAMASK_HUGEPAGE_MALLOC=0` turns the re-execution off; a `glibc.malloc.hugetlb` value already in
`GLIBC_TUNABLES` is kept as it is.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

TUNABLE = 'glibc.malloc.hugetlb=1'
OPT_OUT = 'RETINAMASK_HUGEPAGE_MALLOC'


def env_with_hugepage_malloc(env: Mapping[str, str]) -> dict[str, str]:
  """A copy of `env` whose GLIBC_TUNABLES also holds `TUNABLE`, unless it sets glibc.malloc.hugetlb already."""
  out = dict(env)
  tunables = out.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb=' not in tunables:
    out['GLIBC_TUNABLES'] = f'{tunables}:{TUNABLE}' if tunables else TUNABLE
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


def reexec_with_hugepage_malloc() -> None:
  """Re-executes this process (same interpreter, options and arguments, same PID) with `TUNABLE` in GLIBC_TUNABLES,
  once; returns without doing anything where it is set already or `applies()` is False. Call it first thing in a
  `__main__` block, before any work whose effects would be lost."""
  if not applies():
    return
  env = env_with_hugepage_malloc(os.environ)
  if env.get('GLIBC_TUNABLES') == os.environ.get('GLIBC_TUNABLES'):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  # sys.orig_argv keeps the interpreter's own options (-u, -X ..., -m module) that sys.argv drops.
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

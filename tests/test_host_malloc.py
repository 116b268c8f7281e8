"""retinamask_jax.host_malloc: the GLIBC_TUNABLES and LD_PRELOAD it sets, the one re-execution of an entry point, and
the effect of each remedy on the page faults of an XLA:CPU call with a large temporary buffer."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from retinamask_jax import host_malloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_env_adds_the_tunable_and_keeps_the_rest():
  env = {'A': '1'}
  out = host_malloc.env_with_hugepage_malloc(env)
  assert out == {'A': '1', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  assert env == {'A': '1'}  # not modified in place
  out = host_malloc.env_with_hugepage_malloc({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'})
  assert out['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  # The user's own choice of the same tunable wins, whatever its value.
  for value in ('glibc.malloc.hugetlb=0', 'glibc.malloc.trim_threshold=1:glibc.malloc.hugetlb=2'):
    assert host_malloc.env_with_hugepage_malloc({'GLIBC_TUNABLES': value})['GLIBC_TUNABLES'] == value


def test_env_preloads_tcmalloc_unless_an_allocator_is_preloaded():
  lib = 'libtcmalloc_minimal.so.4'
  out = host_malloc.env_with_host_malloc({'A': '1'}, lib)
  assert out['LD_PRELOAD'] == lib and out['GLIBC_TUNABLES'] == host_malloc.TUNABLE and out['A'] == '1'
  assert int(out['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD']) >= 1 << 40  # no "large alloc" line at every step
  # Other preloaded libraries stay, after tcmalloc (the first library that defines malloc provides it).
  assert host_malloc.env_with_host_malloc({'LD_PRELOAD': '/x/libfoo.so'}, lib)['LD_PRELOAD'] == f'{lib}:/x/libfoo.so'
  # A user's allocator, or tcmalloc already there, is kept as it is; so is the user's report threshold.
  for preload in ('/usr/lib/libjemalloc.so.2', 'libfoo.so libmimalloc.so.2', lib):
    assert host_malloc.env_with_host_malloc({'LD_PRELOAD': preload}, lib)['LD_PRELOAD'] == preload
  assert host_malloc.preloaded_allocator({'LD_PRELOAD': 'libfoo.so /usr/lib/libjemalloc.so.2'}) == \
      '/usr/lib/libjemalloc.so.2'
  assert host_malloc.preloaded_allocator({'LD_PRELOAD': 'libfoo.so'}) is None
  out = host_malloc.env_with_host_malloc({'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD': '5'}, lib)
  assert out['TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD'] == '5'
  # No tcmalloc on the machine: only the tunable.
  assert host_malloc.env_with_host_malloc({'A': '1'}, None) == host_malloc.env_with_hugepage_malloc({'A': '1'})


_PRINT_SCRIPT = textwrap.dedent('''
    import json, os, sys
    sys.path.insert(0, {root!r})
    from retinamask_jax import host_malloc
    print(json.dumps(dict(pid=os.getpid(), tunables=os.environ.get('GLIBC_TUNABLES'),
                          preload=os.environ.get('LD_PRELOAD'), argv=sys.argv[1:])), flush=True)
    host_malloc.reexec_with_host_malloc()
''')

_OURS = ('GLIBC_TUNABLES', 'LD_PRELOAD', 'TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD', host_malloc.OPT_OUT,
         host_malloc.TCMALLOC_OPT_OUT)


def _run_print_script(tmp_path, env_extra: dict[str, str]) -> list[dict]:
  script = tmp_path / 'print_env.py'
  script.write_text(_PRINT_SCRIPT.format(root=ROOT))
  env = {k: v for k, v in os.environ.items() if k not in _OURS}
  env.update(env_extra)
  out = subprocess.run([sys.executable, '-u', str(script), 'a b', '--flag=1'], env=env, capture_output=True,
                       text=True, check=True).stdout
  return [json.loads(line) for line in out.splitlines()]


@pytest.mark.skipif(not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc',
                    reason='glibc tunables only exist on Linux with glibc')
def test_reexec_happens_once_with_the_same_pid_and_arguments(tmp_path):
  first, second = _run_print_script(tmp_path, {})  # exactly two lines: one re-execution, no loop
  assert first['tunables'] is None and second['tunables'] == host_malloc.TUNABLE
  assert first['preload'] is None and second['preload'] == host_malloc.find_tcmalloc()  # None where not installed
  assert first['pid'] == second['pid']
  assert first['argv'] == second['argv'] == ['a b', '--flag=1']
  # RETINAMASK_TCMALLOC=0: glibc's malloc with the tunable.
  _, second = _run_print_script(tmp_path, {host_malloc.TCMALLOC_OPT_OUT: '0'})
  assert second['tunables'] == host_malloc.TUNABLE and second['preload'] is None
  # A value of the user's is extended, not replaced.
  _, second = _run_print_script(tmp_path, {'GLIBC_TUNABLES': 'glibc.malloc.arena_max=4'})
  assert second['tunables'] == 'glibc.malloc.arena_max=4:' + host_malloc.TUNABLE


def test_reexec_can_be_turned_off(tmp_path):
  (only,) = _run_print_script(tmp_path, {host_malloc.OPT_OUT: '0'})
  assert only['tunables'] is None and only['preload'] is None


_FAULTS_SCRIPT = textwrap.dedent('''
    import json, resource
    import jax, jax.numpy as jnp
    x = jnp.ones((1, 66, 66, 256), jnp.float32)
    # 9 shifted copies (36 MB) live only inside the call: XLA's temporary buffer, allocated at every call.
    f = jax.jit(lambda x: jnp.sum(jnp.stack([x[:, i:i + 64, j:j + 64] for i in range(3) for j in range(3)]) ** 2))
    for _ in range(3):
      f(x).block_until_ready()
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
      f(x).block_until_ready()
    print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start) / 10))
''')


def _glibc_at_least(major: int, minor: int) -> bool:
  name, version = platform.libc_ver()
  if name != 'glibc' or not version:
    return False
  return tuple(int(v) for v in version.split('.')[:2]) >= (major, minor)


def _faults_per_call(tmp_path, env_extra: dict[str, str]) -> float:
  """Minor page faults per call of _FAULTS_SCRIPT's function in a fresh process with only `env_extra` of ours set."""
  script = tmp_path / 'faults.py'
  script.write_text(_FAULTS_SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in _OURS}
  env.update(JAX_PLATFORMS='cpu', **env_extra)
  out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, check=True).stdout
  return json.loads(out.splitlines()[-1])


@pytest.mark.skipif(host_malloc.thp_mode() != 'madvise' or not _glibc_at_least(2, 35),
                    reason='the tunable acts only with glibc >= 2.35 and the kernel THP mode "madvise"')
def test_hugepage_malloc_cuts_the_page_faults_of_a_large_temporary(tmp_path):
  default = _faults_per_call(tmp_path, {})
  hugetlb = _faults_per_call(tmp_path, {'GLIBC_TUNABLES': host_malloc.TUNABLE})
  # 4 KiB pages: ~18,000 faults per call (the 72 MB temporary touched page by page); 2 MiB pages: a few hundred.
  assert default > 5000, (default, hugetlb)
  assert hugetlb < default / 4, (default, hugetlb)


@pytest.mark.skipif(host_malloc.find_tcmalloc() is None, reason='tcmalloc is not installed (libtcmalloc-minimal4)')
def test_tcmalloc_reuses_the_large_temporary(tmp_path):
  default = _faults_per_call(tmp_path, {})
  tcmalloc = _faults_per_call(tmp_path, host_malloc.env_with_host_malloc({}, host_malloc.find_tcmalloc()))
  # tcmalloc keeps the freed buffer's pages for the next call. It does give free pages back to the kernel now and
  # then (gradually, as it frees), so a call may re-fault the whole buffer: 0 of 10 calls alone, 1 of 10 (1,844
  # faults per call on average) with the test suite's other worker busy.
  assert default > 5000, (default, tcmalloc)
  assert tcmalloc < default / 4, (default, tcmalloc)

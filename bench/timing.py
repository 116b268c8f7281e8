"""What every bench script shares: the timing rule and writing the results JSON."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def median_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
  """Median wall time of `fn()` in milliseconds over `runs` calls after `warmup` untimed ones; `fn` must block
  until its result is ready (e.g. end with `jax.block_until_ready`)."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def write_json(result: dict[str, Any], path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(result, f, indent=2)
  print(f'wrote {path}')


# ------------------------------------------------------------------------------- shared by the side-by-side benches
# (bench_inference.py, bench_train_step.py, bench_eval.py). Nothing below imports jax or torch at module level: the
# thread limit has to be in place before either creates its thread pool.


def limit_threads(n: int) -> int:
  """Restricts this process (and the subprocesses it starts) to `n` CPU cores; returns the cores it may use.

  XLA's CPU client sizes its thread pool from the process's CPU affinity (tsl's `NumSchedulableCPUs`), and there
  is no XLA flag for its intra-op thread count, so pinning the affinity is what makes JAX use `n` threads; torch
  additionally gets `torch.set_num_threads(n)` (see `import_torch`). Call it before the first JAX computation.
  `n <= 0` leaves the affinity as it is.
  """
  cpus = sorted(os.sched_getaffinity(0))
  if 0 < n < len(cpus):
    cpus = cpus[:n]
    os.sched_setaffinity(0, cpus)
  # OpenMP / MKL pools (torch, numpy's BLAS) read these when they start.
  for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS'):
    os.environ[var] = str(len(cpus))
  return len(cpus)


def import_torch(threads: int, skip: bool = False):
  """(torch, torchvision) with torch limited to `threads` intra-op threads, or (None, None) when they are not
  installed (or `skip`); the caller prints that the torchvision rows are skipped."""
  if skip:
    return None, None
  try:
    import torch
    import torchvision
  except ImportError:
    return None, None
  torch.set_num_threads(max(threads, 1))
  return torch, torchvision


def machine_info(torch_module: Any = None) -> dict[str, Any]:
  """Where and with what a result was measured: CPUs (count, affinity, model), versions, threads, XLA_FLAGS, date."""
  import datetime
  import platform

  import jax
  import jaxlib

  from retinamask_jax import host_malloc

  cpu_model = platform.processor()
  try:
    with open('/proc/cpuinfo') as f:
      cpu_model = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu_model)
  except OSError:
    pass
  info = dict(
      date=datetime.datetime.now().astimezone().isoformat(timespec='seconds'),
      cpu_count=os.cpu_count(),
      cpus_used=len(os.sched_getaffinity(0)),
      cpu_model=cpu_model,
      platform=platform.platform(),
      python=platform.python_version(),
      jax_version=jax.__version__,
      jaxlib_version=jaxlib.__version__,
      jax_backend=jax.default_backend(),
      jax_device=jax.devices()[0].device_kind,
      xla_flags=os.environ.get('XLA_FLAGS', ''),
      glibc_tunables=os.environ.get('GLIBC_TUNABLES', ''),  # retinamask_jax.host_malloc
      ld_preload=os.environ.get('LD_PRELOAD', ''),  # tcmalloc, where host_malloc found it
      transparent_hugepages=host_malloc.thp_mode(),
      torch_version=None,
      torchvision_version=None,
      torch_threads=None,
  )
  if torch_module is not None:
    import torchvision

    info.update(torch_version=torch_module.__version__, torchvision_version=torchvision.__version__,
                torch_threads=torch_module.get_num_threads())
  return info


def xla_flops(compiled: Any) -> float | None:
  """FLOPs of a compiled (or lowered) JAX program from XLA's cost analysis; a multiply-add counts as 2 FLOPs.
  None when the backend gives no estimate."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device program
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def jax_matmul_gflops(n: int, runs: int, warmup: int) -> float:
  """This machine's float32 matmul rate under JAX in GFLOP/s: an [n, n] @ [n, n] `jnp.dot` counted as 2 n^3 FLOPs,
  fastest of `runs` calls (a peak: one slow call on a shared VM would halve a median of a few). The FLOP floor of a
  program is its XLA FLOPs divided by this rate."""
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  ms = min(timed_steps(lambda: dot(a, b).block_until_ready(), runs, warmup)['times_ms'])
  return 2.0 * n**3 / (ms * 1e-3) / 1e9


def torch_matmul_gflops(torch_module: Any, n: int, runs: int, warmup: int) -> float:
  """The same rate as `jax_matmul_gflops` for `torch.mm` (float32), for reference."""
  g = torch_module.Generator().manual_seed(0)
  a = torch_module.randn(n, n, generator=g)
  b = torch_module.randn(n, n, generator=g)
  ms = min(timed_steps(lambda: torch_module.mm(a, b), runs, warmup)['times_ms'])
  return 2.0 * n**3 / (ms * 1e-3) / 1e9


def timed_steps(fn: Callable[[], Any], runs: int, warmup: int) -> dict[str, Any]:
  """`fn()` timed `runs` times after `warmup` untimed calls (`fn` must block until its result is ready): each call's
  wall time (`times_ms`), their mean and median, and, on Linux, the minor page faults and kernel CPU seconds per call
  and this process's anonymous memory on transparent huge pages afterwards. The mean is the throughput figure: on a VM
  whose host reclaims freed guest memory (free page reporting), a step that re-faults its buffers is slow every other
  call, and a median of such a two-valued series is either value. The faults and kernel time say which buffers a
  step got (retinamask_jax/host_malloc.py)."""
  import resource

  for _ in range(warmup):
    fn()
  before = resource.getrusage(resource.RUSAGE_SELF)
  times = []
  for _ in range(runs):
    start = time.perf_counter()
    fn()
    times.append(1e3 * (time.perf_counter() - start))
  after = resource.getrusage(resource.RUSAGE_SELF)
  out: dict[str, Any] = dict(times_ms=[round(t, 1) for t in times], mean_ms=float(np.mean(times)),
                             median_ms=float(np.median(times)),
                             minflt_per_step=(after.ru_minflt - before.ru_minflt) / runs,
                             sys_s_per_step=(after.ru_stime - before.ru_stime) / runs)
  if os.path.exists('/proc/self/smaps_rollup'):
    with open('/proc/self/smaps_rollup') as f:
      for line in f:
        if line.startswith('AnonHugePages:'):
          out['anon_huge_mb'] = int(line.split()[1]) / 1024.0
  return out


def max_rss_mb() -> float:
  """Peak resident memory of this process so far, in MB (Linux reports ru_maxrss in KiB)."""
  import resource

  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def start_layer_bench(threads: int, skip_torch: bool) -> tuple[int, Any, float]:
  """What a one-layer bench does first: pin `threads` cores, import torch (unless `skip_torch`), measure and print
  JAX's float32 matmul rate on 2048^3. Returns (threads, torch or None, GFLOP/s)."""
  threads = limit_threads(threads)
  torch, _ = import_torch(threads, skip=skip_torch)
  peak = jax_matmul_gflops(2048, 10, 2)
  print(f'float32 matmul 2048^3 on {threads} cores: jnp.dot {peak:.1f} GFLOP/s', flush=True)
  return threads, torch, peak


def start_side_by_side(threads: int, skip_torch: bool, matmul_n: int) -> tuple[int, Any, Any, dict[str, Any]]:
  """What a side-by-side bench does first: pin `threads` cores, import torch (unless `skip_torch`; says when its
  rows are skipped), and measure both frameworks' float32 matmul rate on `matmul_n`^3 (the FLOP floor's peak).
  Returns (threads, torch or None, torchvision or None, peak dict)."""
  threads = limit_threads(threads)
  torch, torchvision = import_torch(threads, skip=skip_torch)
  if torch is None:
    print('torchvision rows skipped: torch / torchvision not importable (or --no-torch)')
  peak = dict(matmul_n=matmul_n, jax_gflops=jax_matmul_gflops(matmul_n, 10, 2))
  if torch is not None:
    peak['torch_gflops'] = torch_matmul_gflops(torch, matmul_n, 10, 2)
  print(f'float32 matmul {matmul_n}^3 on {threads} cores: jnp.dot {peak["jax_gflops"]:.1f} GFLOP/s'
        + (f', torch.mm {peak["torch_gflops"]:.1f} GFLOP/s' if torch is not None else ''), flush=True)
  return threads, torch, torchvision, peak

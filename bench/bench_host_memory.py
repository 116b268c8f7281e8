"""What re-touching freed memory costs on this machine: the pattern of XLA:CPU's per-call temporary buffer, without XLA.

  python bench/bench_host_memory.py [--mb 2000] [--iterations 8] [--schedules 0:0,1.9:0,0:3] [--no-huge]
      [--out bench/results/host_memory.json]

Each iteration maps `--mb` MB of anonymous memory (marked for transparent huge pages unless `--no-huge`), writes one
byte per 4 KiB page (timed, with the page faults and kernel CPU time it took), holds the mapping for HOLD seconds (a
train step using its buffer), unmaps it and waits WAIT seconds before the next one; `--schedules` lists HOLD:WAIT
pairs. On a VM whose kernel reports free memory to the host (virtio-balloon free page reporting, see
retinamask_jax/host_malloc.py) touching memory the host has taken back costs ~1 ms per MB in the kernel, so the
touch times split into fast (~0.05 ms per MB, pages reused at once) and slow iterations; elsewhere they stay fast.
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import sys
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)
sys.path.insert(0, os.path.dirname(BENCH))  # the repository root, for timing.machine_info
from timing import machine_info, write_json  # noqa: E402


def touch_times(mb: int, iterations: int, hold_s: float, wait_s: float, huge: bool) -> list[dict[str, float]]:
  """One row per iteration: ms to first-touch the fresh mapping, its minor faults and kernel seconds."""
  rows = []
  for _ in range(iterations):
    before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    block = mmap.mmap(-1, mb << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge and hasattr(mmap, 'MADV_HUGEPAGE'):
      block.madvise(mmap.MADV_HUGEPAGE)
    pages = np.frombuffer(block, dtype=np.uint8)
    pages[::4096] = 1
    after, ms = resource.getrusage(resource.RUSAGE_SELF), 1e3 * (time.perf_counter() - start)
    time.sleep(hold_s)
    del pages
    block.close()
    rows.append(dict(touch_ms=round(ms, 1), minflt=after.ru_minflt - before.ru_minflt,
                     sys_s=round(after.ru_stime - before.ru_stime, 3)))
    time.sleep(wait_s)
  return rows


def page_reporting_order() -> str | None:
  """The kernel's free page reporting order (blocks of 2^order pages are reported to the host), None if absent."""
  try:
    with open('/sys/module/page_reporting/parameters/page_reporting_order') as f:
      return f.read().strip()
  except OSError:
    return None


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--mb', type=int, default=2000, help='size of the mapping (the R-50 batch-2 step: ~2,100 MB)')
  parser.add_argument('--iterations', type=int, default=8)
  parser.add_argument('--schedules', default='0:0,1.9:0,0:3', help='comma-separated HOLD:WAIT seconds')
  parser.add_argument('--no-huge', dest='huge', action='store_false', help='leave the mapping on 4 KiB pages')
  parser.add_argument('--out', default=os.path.join(BENCH, 'results', 'host_memory.json'))
  args = parser.parse_args()

  print(f'{args.mb} MB, {"huge" if args.huge else "4 KiB"} pages; page_reporting_order: {page_reporting_order()}')
  print('| hold (s) | wait (s) | touch ms, each iteration | kernel s, each iteration |\n|---|---|---|---|')
  schedules = []
  for pair in args.schedules.split(','):
    hold_s, wait_s = (float(v) for v in pair.split(':'))
    rows = touch_times(args.mb, args.iterations, hold_s, wait_s, args.huge)
    schedules.append(dict(hold_s=hold_s, wait_s=wait_s, iterations=rows))
    touch = ', '.join(f"{r['touch_ms']:.0f}" for r in rows)
    kernel = ', '.join(f"{r['sys_s']:.2f}" for r in rows)
    print(f'| {hold_s:g} | {wait_s:g} | {touch} | {kernel} |', flush=True)
  write_json(dict(benchmark='re-touching freed memory', machine=machine_info(), mb=args.mb, huge_pages=args.huge,
                  page_reporting_order=page_reporting_order(), schedules=schedules), args.out)


if __name__ == '__main__':
  main()

"""Wall time of a 6-run sweep (3 best-match thresholds x 2 seeds) of the tiny config, three ways:

  per_process  one `python train.py` per run, as every peer codebase does (a process, imports and a compile each)
  sequential   `python -m retinamask_jax.sweep`: one process, the runs one after another, one compile
  vmap         `python -m retinamask_jax.sweep --vmap`: the 6 runs trained as one program

Each way trains and evaluates every run (tiny: 20 steps x batch 2 on a 128 x 128 canvas, 16 val images) and is a
separate process tree, timed from launch to exit. The shapes data is generated once beforehand and shared.

  python bench/bench_sweep.py [--steps 20]

Prints a table and writes bench/results/sweep.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import write_json  # noqa: E402

THRESHOLDS = (0.0, 0.3, 0.5)
SEEDS = (0, 1)


def _run(cmd: list[str]) -> float:
  start = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results', 'sweep.json'))
  args = parser.parse_args()
  py = sys.executable
  common = ['--config', 'configs/tiny.py', f'--config.train.num_steps={args.steps}',
            '--config.eval.num_prediction_images=0']
  with tempfile.TemporaryDirectory() as tmp:
    # Shared data, generated outside the timings (the sweep command would otherwise make it once, train.py per run).
    gen = os.path.join(tmp, 'gen')
    subprocess.run([py, '-m', 'retinamask_jax.sweep', *common, '--workdir', gen, '--config.train.num_steps=0',
                    '--grid', 'matching.best_match_threshold=0.0'], cwd=ROOT, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shapes = os.path.join(gen, 'data', 'shapes')
    data = [f'--config.data.{split}_{kind}={shapes}/{split}/{name}' for split in ('train', 'val')
            for kind, name in (('json', 'instances.json'), ('images', 'images'))]
    grid = ['--grid', 'matching.best_match_threshold=' + ','.join(str(t) for t in THRESHOLDS),
            '--seeds', str(len(SEEDS))]
    results = {}
    per_process = 0.0
    for t in THRESHOLDS:
      for s in SEEDS:
        per_process += _run([py, 'train.py', *common, *data, '--workdir', os.path.join(tmp, f'pp_{t}_{s}'),
                             f'--config.matching.best_match_threshold={t}', f'--config.seed={s}',
                             '--config.data.seed=0'])
    results['per_process'] = per_process
    results['sequential'] = _run([py, '-m', 'retinamask_jax.sweep', *common, *data, *grid,
                                  '--workdir', os.path.join(tmp, 'seq')])
    results['vmap'] = _run([py, '-m', 'retinamask_jax.sweep', *common, *data, *grid, '--vmap',
                            '--workdir', os.path.join(tmp, 'vmap')])
    with open(os.path.join(tmp, 'vmap', 'sweep.json')) as f:
      vrows = json.load(f)
    with open(os.path.join(tmp, 'seq', 'sweep.json')) as f:
      srows = json.load(f)
  compiles = {'per_process': len(THRESHOLDS) * len(SEEDS),
              'sequential': sum(r['train_step_compilations'] for r in srows),
              'vmap': sum(r['train_step_compilations'] for r in vrows)}
  print(f'6-run sweep of configs/tiny.py, {args.steps} steps per run, train + eval, {os.cpu_count()} CPUs')
  print(f'{"way":<12} {"wall s":>8} {"vs per_process":>15} {"train-step compiles":>20}')
  for way, seconds in results.items():
    print(f'{way:<12} {seconds:8.1f} {results["per_process"] / seconds:14.2f}x {compiles[way]:>20}')
  write_json({'machine': platform.platform(), 'cpus': os.cpu_count(), 'steps': args.steps,
              'runs': len(THRESHOLDS) * len(SEEDS), 'wall_seconds': results, 'train_step_compilations': compiles},
             args.out)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()

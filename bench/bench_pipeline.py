"""Training input pipeline throughput (images/s) with 0, 1, 2 grain workers on COCO-like images.

The data: the shapes writer at COCO size (sides 480..640, ~7 shapes per image, JPEG and PNG), with
full-size targets (max_instances 100, mask crops 112 x 112). Two scales: the authors' 800 x 1333
(canvas 896 x 1408) and a 512 x 853 one (canvas 512 x 896). Each measurement takes the first batch
(worker start-up, spawn + imports) apart and reports the steady rate over the following batches.

  python bench/bench_pipeline.py [--workers 0,1,2] [--batches 12] [--batch_size 8] [--copy_paste 0,1]

--copy_paste: the `data.copy_paste.prob` values to measure (each another row), e.g. what copy-paste augmentation
adds to the host's work per image.

Prints a table and writes bench/results/pipeline.json (with the machine's CPU count: the rate
scales with the cores the workers get).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
from timing import write_json  # noqa: E402

from configs import base  # noqa: E402
from retinamask_jax.data import coco, pipeline, shapes  # noqa: E402

SCALES = {'800x1333': (800, 1333), '512x853': (512, 853)}


def _config(min_size: int, max_size: int, copy_paste: float = 0.0):
  c = base.get_config()
  c.data.copy_paste.prob = copy_paste
  c.data.min_sizes = (min_size,)
  c.data.max_size = max_size
  c.data.crowd = 'drop'
  return c


def measure(dataset, config, *, batch_size: int, workers: int, batches: int) -> dict:
  it = pipeline.make_train_iterator(dataset, config, global_batch_size=batch_size, num_workers=workers)
  t0 = time.perf_counter()
  first = next(it)
  t1 = time.perf_counter()
  canvas = list(first['image'].shape[1:3])
  del first
  for _ in range(batches):
    batch = next(it)
    del batch
  t2 = time.perf_counter()
  if hasattr(it, 'close'):
    it.close()
  del it
  gc.collect()
  return {
    'workers': workers,
    'first_batch_s': round(t1 - t0, 3),
    'images_per_s': round(batches * batch_size / (t2 - t1), 2),
    'canvas': canvas,
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workers', default='0,1,2')
  parser.add_argument('--copy_paste', default='0', help='data.copy_paste.prob values, comma-separated')
  parser.add_argument('--batches', type=int, default=12)
  parser.add_argument('--batch_size', type=int, default=8)
  parser.add_argument('--num_images', type=int, default=200)
  parser.add_argument('--data_dir', default=os.path.join(tempfile.gettempdir(), 'retinamask_bench'))
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results', 'pipeline.json'))
  args = parser.parse_args()

  t = time.perf_counter()
  json_path, images_dir = shapes.write_shapes_dataset(
    args.data_dir, 'train', args.num_images, image_size=(480, 640), seed=0, mean_objects=7.0
  )
  print(f'dataset: {args.num_images} images in {images_dir} ({time.perf_counter() - t:.1f} s)')
  dataset = coco.load_coco(json_path, images_dir)
  per_image = sum(len(r.boxes) for r in dataset.records) / len(dataset.records)
  print(f'{per_image:.1f} instances per image (after occlusion)')

  rows = []
  for scale, (min_size, max_size) in SCALES.items():
    for prob in (float(p) for p in args.copy_paste.split(',')):
      config = _config(min_size, max_size, prob)
      for workers in (int(w) for w in args.workers.split(',')):
        r = measure(
          dataset, config, batch_size=args.batch_size, workers=workers, batches=args.batches
        )
        r['scale'] = scale
        r['copy_paste'] = prob
        rows.append(r)
        print(f'  {scale:>9}  copy_paste={prob}  workers={workers}  {r["images_per_s"]:7.2f} img/s   '
              f'(first batch {r["first_batch_s"]:.2f} s, canvas {r["canvas"]})', flush=True)

  print()
  print('| scale | canvas | copy-paste prob | workers | images/s | first batch (s) |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f'| {r["scale"]} | {r["canvas"][0]}x{r["canvas"][1]} | {r["copy_paste"]} | {r["workers"]} | '
          f'{r["images_per_s"]} | {r["first_batch_s"]} |')
  result = {
    'benchmark': 'training input pipeline',
    'batch_size': args.batch_size,
    'batches_timed': args.batches,
    'max_instances': 100,
    'mask_size': 112,
    'instances_per_image': round(per_image, 2),
    'cpu_count': os.cpu_count(),
    'machine': platform.machine(),
    'python': platform.python_version(),
    'results': rows,
  }
  write_json(result, args.out)


if __name__ == '__main__':
  from retinamask_jax import host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py runs: tcmalloc or huge pages for XLA's buffers
  main()

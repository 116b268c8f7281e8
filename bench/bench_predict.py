"""What a serving user pays for one photo: `Detector.predict([image])` next to torchvision's `model([image])`.

  python bench/bench_predict.py [--size 800x1088] [--runs 10] [--out bench/results/predict.json]

Run it as a plain `python` process with no environment set (no tcmalloc preload, no XLA_FLAGS, no thread limit):
what a user's own script gets. The library does not re-execute itself (only train.py / eval.py / predict.py do, see
retinamask_jax/host_malloc.py), and this script sets nothing: both sides use every core they see.

The model: torchvision's `retinanet_resnet50_fpn`, seeded random weights (nothing is downloaded) with random BN
statistics and its class predictor rescaled so that a few hundred detections pass the 0.05 threshold (at init every
score is 0.01, and torchvision would then skip its NMS). Saved as a `.pth` and converted with `python -m
retinamask_jax.convert.torchvision` (configs/torchvision_retinanet_r50.py: torchvision's resize, padding to 32 and
anchors), then loaded with `Detector.from_checkpoint`, as a user does.

Both sides end to end from the same uint8 [H, W, 3] photo in memory (random pixels, 800 x 1088 by default: the test
size, so neither side rescales):
- ours: `Detector.predict([image])`: resize rule, normalization, placing on its canvas (800 x 1088), the jitted
  program (batch 1), copying the detections back, scaling boxes to the image;
- torchvision: `model([torch.from_numpy(image).permute(2, 0, 1) / 255.0])` in `torch.inference_mode()`.
First call (ours: compiling the (batch 1, 800 x 1088) program) and steady state (median of `--runs` calls after one
more untimed call) separately; the runs alternate between the two sides so that a noisy neighbour hits both.
Also timed: our compiled program alone on the prepared canvas (`program`), so `predict - program` is the host work.
The detections of both sides are compared with the parity criterion of tests/test_predict_parity.py.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, 'bench'))

import timing  # noqa: E402


def calibrated_retinanet(torch, torchvision, image: np.ndarray):
  """Seeded random retinanet_resnet50_fpn in eval mode, random BN statistics, predictor rescaled on `image`."""
  torch.manual_seed(0)
  model = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None)
  g = torch.Generator().manual_seed(1)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      with torch.no_grad():
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
  model.eval()
  cls, box = model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg
  with torch.no_grad():
    cls.bias.zero_()
    box.bias.zero_()
    batch, _ = model.transform([torch.from_numpy(image).permute(2, 0, 1) / 255.0])
    head = model.head(list(model.backbone(batch.tensors).values()))
    logits = head['cls_logits'].reshape(1, -1, cls.out_channels)
    mean, std = logits.mean(dim=(0, 1)), logits.std(dim=(0, 1))
    cls.weight.div_(std[:, None, None, None])
    shift = float(np.log(0.05 / 0.95)) - float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - 1 / 8000)))
    cls.bias.copy_(-mean / std + shift)
    box.weight.mul_(0.3 / head['bbox_regression'].std())
  return model


def matched_fraction(ours: dict, want: dict) -> float:
  """Share of torchvision's detections matched one to one by ours (same label, IoU > 0.999, score within 1e-3)."""
  sys.path.insert(0, os.path.join(ROOT, 'tests'))
  import tv_reference

  return tv_reference.matched_fraction(ours, want)[0]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--size', default='800x1088', help='HxW of the photo')
  parser.add_argument('--runs', type=int, default=10)
  parser.add_argument('--out', default=os.path.join(ROOT, 'bench', 'results', 'predict.json'))
  args = parser.parse_args()
  h, w = (int(v) for v in args.size.split('x'))
  load_before = os.getloadavg()
  image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)

  import torch
  import torchvision

  model = calibrated_retinanet(torch, torchvision, image)
  workdir = tempfile.mkdtemp(prefix='bench-predict-')
  pth, converted = os.path.join(workdir, 'retinanet.pth'), os.path.join(workdir, 'converted')
  torch.save(model.state_dict(), pth)
  subprocess.run([sys.executable, '-m', 'retinamask_jax.convert.torchvision', '--in', pth, '--out', converted],
                 check=True, cwd=ROOT, capture_output=True)

  import jax

  from retinamask_jax.export import Detector

  start = time.perf_counter()
  detector = Detector.from_checkpoint(converted)
  load_s = time.perf_counter() - start

  def ours():
    return detector.predict([image])[0]

  def theirs():
    with torch.inference_mode():
      out = model([torch.from_numpy(image).permute(2, 0, 1) / 255.0])[0]
    return {k: v.numpy() for k, v in out.items()}

  start = time.perf_counter()
  first_ours = ours()
  ours_first_s = time.perf_counter() - start
  start = time.perf_counter()
  first_theirs = theirs()
  theirs_first_s = time.perf_counter() - start
  ours(), theirs()  # one more untimed call each

  # The compiled program alone, on the canvas predict prepares.
  (key, program), = detector._programs.items()
  canvas = np.zeros((1, key[1], key[2], 3), np.float32)
  _, resized, _ = detector._prepare(image, canvas[0])
  sizes = np.asarray([resized], np.int32)
  variables = detector._placed[1]

  times = {'ours': [], 'theirs': [], 'program': []}
  for _ in range(args.runs):
    for name, fn in (('ours', ours), ('theirs', theirs),
                     ('program', lambda: jax.block_until_ready(program(variables, canvas, sizes)))):
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  med = {k: float(np.median(v)) for k, v in times.items()}
  frac = matched_fraction(first_ours, first_theirs)
  result = {
      'what': 'Detector.predict([one uint8 photo]) vs torchvision model([image / 255]), plain python process',
      'date': datetime.date.today().isoformat(),
      'machine': f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible',
      'cpu_model': _cpu_model(),
      'image_hw': [h, w],
      'canvas_hw': [key[1], key[2]],
      'env': {k: os.environ.get(k) for k in ('LD_PRELOAD', 'XLA_FLAGS', 'OMP_NUM_THREADS', 'GLIBC_TUNABLES')},
      'versions': {'jax': jax.__version__, 'torch': torch.__version__, 'torchvision': torchvision.__version__},
      'torch_threads': torch.get_num_threads(),
      'load_s': load_s,
      'first_call_s': {'ours': ours_first_s, 'torchvision': theirs_first_s},
      'steady_median_s': {'ours': med['ours'], 'torchvision': med['theirs'], 'ours_program_only': med['program']},
      'steady_all_s': times,
      'ratio_ours_over_torchvision': med['ours'] / med['theirs'],
      'host_work_s': med['ours'] - med['program'],
      'detections': {'ours': int(len(first_ours['scores'])), 'torchvision': int(len(first_theirs['scores']))},
      'torchvision_detections_matched': frac,
      'runs': args.runs,
      # Other processes on the machine slow both sides (the runs alternate); recorded so that rows can be compared.
      'loadavg_1_5_15': {'start': list(load_before), 'end': list(os.getloadavg())},
  }
  print(f'first call: ours {ours_first_s:.2f} s (compile included), torchvision {theirs_first_s:.2f} s')
  print(f'steady state (median of {args.runs}): ours {med["ours"]:.3f} s, torchvision {med["theirs"]:.3f} s, '
        f'ratio {result["ratio_ours_over_torchvision"]:.2f}; our program alone {med["program"]:.3f} s')
  print(f'detections: ours {result["detections"]["ours"]}, torchvision {result["detections"]["torchvision"]}, '
        f'{100 * frac:.1f} % of torchvision\'s matched')
  timing.write_json(result, args.out)


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


if __name__ == '__main__':
  main()

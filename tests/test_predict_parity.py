"""torchvision's detections on any photo, through the public API: a seeded random torchvision RetinaNet saved as a
`.pth`, converted by `python -m retinamask_jax.convert.torchvision`, loaded with `Detector.from_checkpoint` and run
with `Detector.predict([uint8 image])`, against torchvision's `model([image / 255])` on random uint8 images of
random sizes (both orientations, up- and downscaled). Also the pieces of that input path against torchvision's own
(resize arithmetic, float bilinear, anchor strides on canvases that are not multiples of 128), and what `predict`
compiles and pads.

Criterion (issue 24): >= 99 % of torchvision's detections matched on each image by one of ours with the same
category id, IoU > 0.999 and a score within 1e-3.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

import tv_reference  # noqa: E402

from retinamask_jax.convert import torchvision as tvc  # noqa: E402
from retinamask_jax.data import pipeline  # noqa: E402
from retinamask_jax.data import transforms as T  # noqa: E402
from retinamask_jax.export import Detector  # noqa: E402
from retinamask_jax.ops import anchors as anchor_ops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIN_MATCHED = 0.99


# ------------------------------------------------------------------------------------------------ the pieces


def test_resize_arithmetic_and_bilinear_equal_torchvision_transform():
  """`torchvision_resized_hw` + `resize_float_bilinear` on the normalized image equal GeneralizedRCNNTransform's
  resize (sizes exactly, values to float32 rounding), on random sizes up- and downscaled, both orientations."""
  from torchvision.models.detection.transform import GeneralizedRCNNTransform

  rng = np.random.default_rng(0)
  transform = GeneralizedRCNNTransform(800, 1333, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]).eval()
  sizes = [(480, 640), (600, 400), (1000, 1400), (427, 640), (333, 500), (37, 1200)]
  sizes += [tuple(int(v) for v in rng.integers(100, 1500, 2)) for _ in range(14)]
  worst = 0.0
  for k, (h, w) in enumerate(sizes):
    assert T.torchvision_resized_hw(h, w, 800, 1333) == tuple(transform.resize(torch.zeros(1, h, w))[0].shape[1:])
    if k < 6:  # values on a few (each costs a full-size interpolation)
      image = rng.random((h, w, 3), dtype=np.float32)
      with torch.no_grad():
        want = transform.resize(torch.from_numpy(image).permute(2, 0, 1))[0].permute(1, 2, 0).numpy()
      got = T.resize_float_bilinear(image, want.shape[:2])
      worst = max(worst, float(np.abs(got - want).max()))
  print(f'float bilinear vs torch: max abs diff {worst:.2e} (values in [0, 1])')
  assert worst < 1e-6


@pytest.mark.parametrize('canvas', [(800, 1088), (224, 384), (1088, 800), (800, 1344), (96, 160)])
def test_torchvision_anchor_strides_on_canvases_of_multiples_of_32(canvas):
  """torchvision's AnchorGenerator computes each level's stride as canvas // grid: 61 x 64 on P6 of 800 x 1088."""
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList

  sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in (32, 64, 128, 256, 512))
  generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
  h, w = canvas
  features = [torch.zeros(1, 1, fh, fw) for fh, fw in anchor_ops.level_shapes(canvas)]
  want = generator(ImageList(torch.zeros(1, 3, h, w), [(h, w)]), features)[0].numpy()
  np.testing.assert_array_equal(anchor_ops.generate_anchors(canvas, preset='torchvision'), want)
  if canvas == (800, 1088):
    assert anchor_ops.level_strides(canvas, 6, 'torchvision') == (61, 64)
    assert anchor_ops.level_strides(canvas, 7, 'torchvision') == (114, 120)
  assert anchor_ops.level_strides(canvas, 7, 'authors') == (128, 128)


def test_bucketed_canvases_and_batches():
  assert pipeline.bucket_canvas((800, 1066), (800, 1344), 32) == (800, 1088)
  assert pipeline.bucket_canvas((800, 1066), (896, 1408), 128) == (896, 1152)
  assert pipeline.bucket_canvas((801, 1400), (896, 1408), 128) == (896, 1408)  # never above the largest
  assert pipeline.test_canvas(800, 1333, 'portrait', 32) == (1344, 800)
  assert [Detector.batch_for(n) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
  assert [Detector.batch_for(n, 8) for n in (1, 3, 9)] == [8, 8, 16]
  assert Detector.batch_for(3, 3) == 6


# ------------------------------------------------------------------------------------------------ end to end


def convert(model, tmp_path, *, test_min_size: int, test_max_size: int) -> Detector:
  """The user's path: torch.save the state dict, run the converter command (with a config file that sets the test
  size, as a user would for another size), Detector.from_checkpoint."""
  pth, out, cfg = str(tmp_path / 'retinanet.pth'), str(tmp_path / 'converted'), str(tmp_path / 'tv_small.py')
  torch.save(model.state_dict(), pth)
  with open(cfg, 'w') as f:
    f.write(textwrap.dedent(f"""\
        from configs import torchvision_retinanet_r50

        def get_config():
          c = torchvision_retinanet_r50.get_config()
          c.data.test_min_size = {test_min_size}
          c.data.test_max_size = {test_max_size}
          return c
        """))
  args = ['--in', pth, '--out', out] + ([] if (test_min_size, test_max_size) == (800, 1333) else ['--config', cfg])
  assert tvc.main(args) == 0
  return Detector.from_checkpoint(out)


def check_parity(detector, model, images, what):
  """Each image alone on both sides, then all of them in one `predict` call (the same results: each image keeps
  its own canvas). Returns per-image (matched fraction, max box diff px, max score diff, torchvision count)."""
  rows = []
  alone = [detector.predict([image])[0] for image in images]
  together = detector.predict(images)
  for image, ours, both in zip(images, alone, together):
    want = tv_reference.torchvision_detections(model, image)
    frac, box_err, score_err = tv_reference.matched_fraction(ours, want)
    rows.append((image.shape[:2], frac, box_err, score_err, len(want['scores'])))
    print(f'{what} {image.shape[0]}x{image.shape[1]}: {len(want["scores"])} torchvision detections, '
          f'{100 * frac:.2f} % matched, max box diff {box_err:.2e} px, max score diff {score_err:.2e}')
    assert len(want['scores']) >= 20, 'too few detections for the test to mean something'
    assert frac >= MIN_MATCHED, (image.shape, frac)
    np.testing.assert_array_equal(both['classes'], ours['classes'])
    np.testing.assert_allclose(both['boxes'], ours['boxes'], atol=1e-3)
    np.testing.assert_allclose(both['scores'], ours['scores'], atol=1e-5)
  return rows


def random_images(seed: int, sizes) -> list[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def test_resnet18_retinanet_predict_matches_torchvision(tmp_path):
  """A torchvision RetinaNet on ResNet-18-FPN (11 classes, for speed) at test size 256 / 416: a landscape image
  upscaled (resized to 256 x 341, canvas 256 x 352) and a portrait one downscaled (to 409 x 256, canvas
  416 x 256)."""
  images = random_images(1, [(150, 200), (800, 500)])
  model = tv_reference.retinanet(18, 0, images, min_size=256, max_size=416, num_classes=11)
  detector = convert(model, tmp_path, test_min_size=256, test_max_size=416)
  assert detector.config.model.backbone.depth == 18 and detector.config.data.resize == 'torchvision'
  check_parity(detector, model, images, 'R18')
  assert sorted(detector._programs) == [(1, 256, 352), (1, 416, 256)]  # together: one image per canvas again


@pytest.mark.slow
def test_resnet50_retinanet_predict_matches_torchvision_on_photo_sizes(tmp_path):
  """torchvision's retinanet_resnet50_fpn (seeded, random) at its test size 800 / 1333, on the sizes of the issue
  (480x640, 600x400, 512x512, 768x1024, 1000x1400, 800x1088) and four random ones."""
  rng = np.random.default_rng(5)
  sizes = [(480, 640), (600, 400), (512, 512), (768, 1024), (1000, 1400), (800, 1088)]
  sizes += [tuple(int(v) for v in rng.integers(200, 1600, 2)) for _ in range(4)]
  images = random_images(6, sizes)
  model = tv_reference.retinanet(50, 0, images[:3])
  detector = convert(model, tmp_path, test_min_size=800, test_max_size=1333)
  check_parity(detector, model, images, 'R50')


# ------------------------------------------------------------------------------------------------ batching


_MULTIDEVICE = textwrap.dedent("""\
    import os, sys
    os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
    import jax, numpy as np
    from retinamask_jax.export import Detector
    detector = Detector.from_checkpoint(sys.argv[1])
    assert jax.local_device_count() == 2
    with np.load(sys.argv[2]) as f:
      images = [f[str(i)] for i in range(len(f.files))]
    out = {}
    for i, r in enumerate(detector.predict(images)):
      out[f'{i}_boxes'], out[f'{i}_scores'], out[f'{i}_classes'] = r['boxes'], r['scores'], r['classes']
    out['programs'] = np.asarray(sorted(detector._programs))
    np.savez(sys.argv[3], **out)
    """)


def tiny_detector() -> Detector:
  """configs/tiny.py with random weights, its class predictor scaled up so that scores spread past 0.05."""
  import jax

  from configs import tiny
  from retinamask_jax.models import retinamask as rm

  c = tiny.get_config()
  c.model.num_classes = 3
  c.model.class_names = ('a', 'b', 'c')
  c.model.category_ids = (7, 8, 9)
  c.model.mask.enabled = False  # not what is tested; a smaller program
  model, init = rm.build_model(c)
  variables = jax.device_get(init(jax.random.key(0), (128, 128)))
  head = variables['params']['head']['cls_logits']
  head['kernel'] = head['kernel'] * 300.0
  head['bias'] = np.random.default_rng(0).normal(-4.0, 1.0, head['bias'].shape).astype(np.float32)
  return Detector(model, c, {k: variables[k] for k in ('params', 'frozen')})


def check_same(got, want):
  np.testing.assert_array_equal(got['classes'], want['classes'])
  np.testing.assert_allclose(got['boxes'], want['boxes'], atol=1e-3)
  np.testing.assert_allclose(got['scores'], want['scores'], atol=1e-5)


PADDING_SIZES = [(96, 128), (90, 128), (96, 120)]  # one canvas (128 x 128)


def test_predict_batch_padding_changes_no_result():
  """Three images of one canvas: one call of batch 4 (one blank row) gives each image the detections it gets alone
  (batch 1); two programs are compiled, one per (batch, canvas)."""
  detector = tiny_detector()
  images = random_images(0, PADDING_SIZES)
  alone = [detector.predict([image])[0] for image in images]
  together = detector.predict(images)
  assert sorted(detector._programs) == [(1, 128, 128), (4, 128, 128)]
  for a, b in zip(alone, together):
    assert len(a['scores']) >= 10
    check_same(b, a)


@pytest.mark.slow
def test_predict_batch_split_over_two_devices_changes_no_result(tmp_path):
  """The same three images in a fresh process with 2 (simulated) devices: the batch is rounded up to 4 rows, 2 per
  device, and each image gets the detections it gets alone on one device."""
  detector = tiny_detector()
  images = random_images(0, PADDING_SIZES)
  alone = [detector.predict([image])[0] for image in images]
  path = detector.export(str(tmp_path / 'tiny'))
  inputs, out = str(tmp_path / 'images.npz'), str(tmp_path / 'two_devices.npz')
  np.savez(inputs, **{str(i): image for i, image in enumerate(images)})
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run([sys.executable, '-c', _MULTIDEVICE, path, inputs, out], env=env,
                        capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
  assert done.returncode == 0, done.stderr[-3000:]
  two = dict(np.load(out))
  assert two['programs'].tolist() == [[4, 128, 128]]
  for i, a in enumerate(alone):
    check_same({k: two[f'{i}_{k}'] for k in ('boxes', 'scores', 'classes')}, a)


def test_evaluation_places_images_as_predict_does(tmp_path):
  """With the torchvision config (eval.bucket_canvases, canvas_multiple 32, torchvision's resize) every evaluation
  row is the image on the canvas `Detector.predict` gives it, pixel for pixel, and each batch holds one canvas."""
  from configs import torchvision_retinanet_r50
  from retinamask_jax.data import coco, shapes

  json_path, images_dir = shapes.write_shapes_dataset(str(tmp_path), 'val', 12, image_size=(90, 170), seed=4)
  dataset = coco.load_coco(json_path, images_dir)
  c = torchvision_retinanet_r50.get_config()
  c.data.test_min_size, c.data.test_max_size = 128, 200
  s = pipeline.eval_settings(c)
  canvases = set()
  for batch in pipeline.make_eval_iterator(dataset, c, batch_size=4, num_workers=0):
    canvas = batch['image'].shape[1:3]
    canvases.add(canvas)
    for j in np.flatnonzero(batch['valid']):
      record = next(r for r in dataset.records if r.image_id == batch['image_id'][j])
      image = T.load_image(record.file_name)
      assert s.canvas_for(*image.shape[:2]) == canvas
      want = np.zeros((*canvas, 3), np.float32)
      assert tuple(batch['image_size'][j]) == pipeline.place_image(image, want, 128, s)
      np.testing.assert_array_equal(batch['image'][j], want)
  assert len(canvases) > 2  # bucketed: more than one canvas per orientation

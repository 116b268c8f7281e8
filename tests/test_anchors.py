"""ops/anchors.py: the authors' Detectron-style anchors (spec 3.1) and torchvision's anchors."""

import numpy as np
import pytest
from conftest import requires_torchvision

from retinamask_jax.ops import anchors as anchor_ops

SIZES = (32, 64, 128, 256, 512)


def detectron_generate_anchors(stride, sizes, aspect_ratios):
  """py-faster-rcnn / Detectron `generate_anchors`, re-stated from spec 3.1 (inclusive +1 boxes).

  Returns [len(ratios) * len(sizes), 4] float64 inclusive boxes [x1, y1, x2, y2], ratio outer,
  size inner.
  """
  out = []
  ref_w = ref_h = float(stride)  # window [0, 0, s - 1, s - 1] has +1 width s
  cx = cy = 0.0 + 0.5 * (stride - 1)
  for r in aspect_ratios:
    ws = round_half_even(np.sqrt(ref_w * ref_h / r))
    hs = round_half_even(ws * r)
    for size in sizes:
      scale = size / stride
      w, h = ws * scale, hs * scale
      out.append([cx - 0.5 * (w - 1), cy - 0.5 * (h - 1), cx + 0.5 * (w - 1), cy + 0.5 * (h - 1)])
  return np.array(out, np.float64)


def round_half_even(x: float) -> float:
  f = np.floor(x)
  d = x - f
  if d > 0.5 or (d == 0.5 and f % 2 == 1):
    return f + 1.0
  return f


def authors_reference_anchors(canvas_hw, sizes=SIZES, ratios=(0.5, 1.0, 2.0), spo=3):
  """All anchors, looping level -> y -> x -> anchor; inclusive boxes made continuous (x2 + 1)."""
  rows = []
  for i, base in enumerate(sizes):
    level = 3 + i
    s = 2**level
    fh = int(np.ceil(canvas_hw[0] / s))
    fw = int(np.ceil(canvas_hw[1] / s))
    cell = detectron_generate_anchors(s, [base * 2 ** (k / spo) for k in range(spo)], ratios)
    for y in range(fh):
      for x in range(fw):
        for a in cell:
          rows.append([a[0] + x * s, a[1] + y * s, a[2] + x * s + 1, a[3] + y * s + 1])
  return np.array(rows, np.float64)


def test_level_shapes_and_counts():
  assert anchor_ops.level_shapes((512, 512)) == ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4))
  assert anchor_ops.level_shapes((800, 1344))[0] == (100, 168)
  assert anchor_ops.level_shapes((640, 384), 3, 5) == ((80, 48), (40, 24), (20, 12))
  # The spec's example: 800 x 1344 -> P6 = ceil(25 / 2) = 13, P7 = 7.
  assert anchor_ops.level_shapes((800, 1344))[3:] == ((13, 21), (7, 11))
  # 22,400 locations, 201,600 anchors (spec 3.1).
  assert sum(anchor_ops.anchors_per_level((800, 1344))) == 201_600


@pytest.mark.parametrize('preset', ['authors', 'torchvision'])
def test_512_canvas_has_49104_anchors(preset):
  anchors = anchor_ops.generate_anchors((512, 512), preset=preset)
  assert anchors.shape == (49_104, 4)
  assert anchors.dtype == np.float32
  per_level = anchor_ops.anchors_per_level((512, 512), preset=preset)
  assert per_level == (36_864, 9_216, 2_304, 576, 144)
  assert sum(per_level) == 49_104


def test_authors_cell_anchors_listed_in_spec():
  # (stride, base size) -> widths x heights from spec 3.1 (2 decimals), ratio outer, scale inner.
  listed = {
      8: [(44, 24), (55.44, 30.24), (69.85, 38.10), (32, 32), (40.32, 40.32), (50.80, 50.80),
          (24, 48), (30.24, 60.48), (38.10, 76.20)],
      16: [(92, 48), (115.91, 60.48), (146.04, 76.20), (64, 64), (80.63, 80.63), (101.59, 101.59),
           (44, 88), (55.44, 110.87), (69.85, 139.69)],
  }
  for stride, wh in listed.items():
    cell = anchor_ops.cell_anchors(stride, stride * 4, preset='authors')
    got = np.stack([cell[:, 2] - cell[:, 0], cell[:, 3] - cell[:, 1]], 1)
    np.testing.assert_allclose(got, np.array(wh), atol=0.006)
    # Centred at s/2 in continuous coordinates (the authors' (s - 1) / 2 plus half a pixel).
    np.testing.assert_allclose(0.5 * (cell[:, 0] + cell[:, 2]), stride / 2, atol=1e-5)
    np.testing.assert_allclose(0.5 * (cell[:, 1] + cell[:, 3]), stride / 2, atol=1e-5)
  # First anchor of each larger level, and the square ones.
  for stride, first, squares in [
      (32, (180, 88), (128, 161.27, 203.19)),
      (64, (364, 184), (256, 322.54, 406.37)),
      (128, (724, 360), (512, 645.08, 812.75)),
  ]:
    cell = anchor_ops.cell_anchors(stride, stride * 4)
    first_wh = [cell[0, 2] - cell[0, 0], cell[0, 3] - cell[0, 1]]
    np.testing.assert_allclose(first_wh, first, atol=0.006)
    np.testing.assert_allclose(cell[3:6, 2] - cell[3:6, 0], squares, atol=0.006)


@pytest.mark.parametrize('canvas', [(128, 256), (256, 128), (200, 136)])
def test_authors_anchors_match_detectron_reference(canvas):
  got = anchor_ops.generate_anchors(canvas)
  want = authors_reference_anchors(canvas)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_custom_levels_ratios_and_scales():
  kwargs = dict(
      min_level=3, max_level=5, sizes=(16, 48, 100), aspect_ratios=(1.0, 3.0), scales_per_octave=2
  )
  got = anchor_ops.generate_anchors((128, 128), **kwargs)
  assert anchor_ops.anchors_per_level((128, 128), **kwargs) == (16 * 16 * 4, 8 * 8 * 4, 4 * 4 * 4)
  assert len(got) == sum(anchor_ops.anchors_per_level((128, 128), **kwargs))
  want = authors_reference_anchors((128, 128), sizes=(16, 48, 100), ratios=(1.0, 3.0), spo=2)
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_memoized_and_read_only():
  a = anchor_ops.generate_anchors((256, 384))
  b = anchor_ops.generate_anchors([256, 384], aspect_ratios=[0.5, 1, 2], sizes=list(SIZES))
  assert a is b
  with pytest.raises(ValueError):
    a[0, 0] = 1.0


def test_bad_arguments():
  with pytest.raises(ValueError, match='preset'):
    anchor_ops.generate_anchors((128, 128), preset='detectron')
  with pytest.raises(ValueError, match='one per level'):
    anchor_ops.generate_anchors((128, 128), sizes=(32, 64))


@requires_torchvision
@pytest.mark.parametrize('canvas', [(256, 384), (384, 128), (512, 512)])
def test_torchvision_preset_equals_anchor_generator(canvas):
  import torch
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList

  # torchvision's retinanet_resnet50_fpn anchor configuration.
  sizes = tuple((x, int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in SIZES)
  generator = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
  h, w = canvas
  images = ImageList(torch.zeros(1, 3, h, w), [(h, w)])
  features = [torch.zeros(1, 1, fh, fw) for fh, fw in anchor_ops.level_shapes(canvas)]
  want = generator(images, features)[0].numpy()
  got = anchor_ops.generate_anchors(canvas, preset='torchvision')
  assert got.shape == want.shape
  np.testing.assert_array_equal(got, want)

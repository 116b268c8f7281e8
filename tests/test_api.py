"""The stable public API of DESIGN.md section 8: names and signatures users (and outside checks) rely on."""

import inspect

import retinamask_jax
from retinamask_jax import losses
from retinamask_jax.ops import boxes, nms, roi_align


def _params(fn):
  return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]


def test_ops_and_losses_signatures():
  assert [n for n, _ in _params(boxes.box_iou)][:2] == ['a', 'b']
  assert [n for n, _ in _params(nms.batched_nms)][:5] == ['boxes', 'scores', 'classes', 'iou_threshold', 'max_output']
  assert [n for n, _ in _params(roi_align.roi_align)][:6] == [
      'features', 'boxes', 'output_size', 'spatial_scale', 'sampling_ratio', 'aligned']
  assert _params(losses.sigmoid_focal_loss)[:4] == [
      ('logits', inspect.Parameter.empty), ('targets', inspect.Parameter.empty), ('alpha', 0.25), ('gamma', 2.0)]


def test_top_level_names():
  assert [n for n, _ in _params(retinamask_jax.build_model)] == ['config']
  detector = retinamask_jax.Detector
  assert [n for n, _ in _params(detector.from_checkpoint)][0] == 'path'
  assert [n for n, _ in _params(detector.predict)][:2] == ['self', 'images']
  assert set(retinamask_jax.__all__) >= {'build_model', 'Detector'}

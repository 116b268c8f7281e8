"""convert/torchvision.py and `model.backbone_init` against torchvision itself (randomly initialized, seeded models;
nothing is downloaded).

The reference is torchvision's own forward pass: ResNet C2-C5, `retinanet_resnet50_fpn`'s FPN features, head outputs
and final detections in eval mode, on three images of different sizes. BN statistics are randomized (so that the
folding and its eps matter) and the random predictors are rescaled so that a few hundred well-separated detections
pass the score threshold (at init every score would be 0.01 < 0.05, and unscaled logits saturate the sigmoid).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

from tv_reference import randomize_bn  # noqa: E402

from configs import tiny, torchvision_retinanet_r50  # noqa: E402
from retinamask_jax.convert import BackboneInitError, init_backbone  # noqa: E402
from retinamask_jax.convert import torchvision as tvc  # noqa: E402
from retinamask_jax.models import resnet as resnet_lib  # noqa: E402
from retinamask_jax.models import retinamask as rm  # noqa: E402
from retinamask_jax.train import step as step_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-4  # relative to the largest magnitude of the reference tensor


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (actual.shape, expected.shape)
  return float(np.abs(actual - expected).max() / max(np.abs(expected).max(), 1e-12))


def nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def sd_numpy(module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------------ ResNet


def torchvision_c2_c5(model, x) -> dict[int, np.ndarray]:
  with torch.no_grad():
    y = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for level, layer in zip(range(2, 6), (model.layer1, model.layer2, model.layer3, model.layer4)):
      y = layer(y)
      out[level] = nhwc(y)
  return out


def run_backbone(name: str, images: np.ndarray, seed: int = 0):
  """(ours C2..C5, torchvision C2..C5, the architecture read off the state dict)."""
  torch.manual_seed(seed)
  model = getattr(torchvision.models, name)(weights=None)
  randomize_bn(model, seed + 1)
  want = torchvision_c2_c5(model, torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  sd = sd_numpy(model)
  arch = tvc.resnet_architecture(sd)
  variables = tvc.resnet_variables(sd)
  module = resnet_lib.resnet(
      arch.depth, groups=arch.groups, width_per_group=arch.width_per_group, stride_in_1x1=False, norm='frozen_bn'
  )
  got = jax.jit(module.apply)(variables, jnp.asarray(images))
  return {k: np.asarray(v) for k, v in got.items()}, want, arch


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_resnet_c2_c5_match_torchvision(name):
  """C2-C5 of a converted ResNet equal torchvision's (eval-mode BN), two images, odd-sized on purpose."""
  images = np.random.default_rng(0).normal(size=(2, 96, 136, 3)).astype(np.float32)
  got, want, arch = run_backbone(name, images)
  assert arch.depth == int(name[6:])
  for level in range(2, 6):
    err = relative_error(got[level], want[level])
    print(f'{name} C{level}: max rel err {err:.2e}')
    assert err < RTOL, (level, err)


@pytest.mark.slow
@pytest.mark.parametrize('name', ['resnet34', 'resnet101', 'resnext101_32x8d'])
def test_deep_resnets_match_torchvision(name):
  images = np.random.default_rng(1).normal(size=(1, 64, 96, 3)).astype(np.float32)
  got, want, _ = run_backbone(name, images)
  for level in range(2, 6):
    assert relative_error(got[level], want[level]) < RTOL, level


@pytest.mark.parametrize(
    'name, arch',
    [
        ('resnet34', tvc.ResNetArchitecture(34)),
        ('resnet101', tvc.ResNetArchitecture(101)),
        ('resnext101_32x8d', tvc.ResNetArchitecture(101, groups=32, width_per_group=8)),
        ('wide_resnet50_2', tvc.ResNetArchitecture(50, width_per_group=128)),
    ],
)
def test_architecture_read_off_the_state_dict(name, arch):
  """Every ImageNet ResNet of torchvision converts onto our ResNet of the same structure, every tensor used."""
  torch.manual_seed(0)
  sd = sd_numpy(getattr(torchvision.models, name)(weights=None))
  assert tvc.resnet_architecture(sd) == arch
  variables = tvc.resnet_variables(sd)
  expected = tvc._abstract_resnet(arch)
  assert jax.tree.structure(variables) == jax.tree.structure(dict(expected))
  assert jax.tree.map(np.shape, variables) == jax.tree.map(lambda a: a.shape, dict(expected))
  n_ours = sum(x.size for x in jax.tree.leaves(variables['params']))
  n_tv = sum(v.size for k, v in sd.items() if k.endswith('weight') and v.ndim == 4)
  assert n_ours == n_tv  # all conv weights, nothing more


def test_bn_eps_is_folded():
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None)
  randomize_bn(model, 1)
  sd = sd_numpy(model)
  for eps in (1e-5, 1e-3):
    frozen = tvc.resnet_variables(sd, bn_eps=eps)['frozen']['res3']['block1']['norm2']
    scale = sd['layer2.1.bn2.weight'].astype(np.float64) / np.sqrt(sd['layer2.1.bn2.running_var'] + eps)
    bias = sd['layer2.1.bn2.bias'] - sd['layer2.1.bn2.running_mean'] * scale
    np.testing.assert_allclose(frozen['scale'], scale, rtol=1e-6)
    np.testing.assert_allclose(frozen['bias'], bias, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------ RetinaNet


@dataclasses.dataclass
class Reference:
  model: object  # torchvision RetinaNet, eval mode
  images: list  # three float [3, h, w] images in [0, 1], different sizes
  state_dict: dict


@pytest.fixture(scope='module')
def reference() -> Reference:
  """torchvision's retinanet_resnet50_fpn, seeded, random BN statistics, test size 256 / 384 (small canvases)."""
  torch.manual_seed(0)
  model = torchvision.models.detection.retinanet_resnet50_fpn(
      weights=None, weights_backbone=None, min_size=256, max_size=384
  )
  randomize_bn(model, 1)
  g = torch.Generator().manual_seed(2)
  # Shapes (3, h, w): resized to 256 x 384, 256 x 320 and 200 x 384 by torchvision (scales 1.28, 1.07, 1.33).
  images = [torch.rand(3, 200, 300, generator=g), torch.rand(3, 240, 300, generator=g),
            torch.rand(3, 150, 288, generator=g)]
  images_u8 = [torch.from_numpy(x).permute(2, 0, 1) / 255.0 for x in uint8_images()]
  cls, box = model.head.classification_head.cls_logits, model.head.regression_head.bbox_reg
  with torch.no_grad():
    cls.bias.zero_()
    box.bias.zero_()
    batch, _ = model.transform(images + images_u8)
    head = model.head(list(model.backbone(batch.tensors).values()))
    # Each (anchor, class) channel standardized over these images, then shifted so that about 1 in 8000 pairs
    # passes 0.05 (a few hundred per image, spread over all classes); box deltas of std 0.3. torchvision's init
    # would make every score 0.01.
    logits = head['cls_logits'].reshape(len(images) * 2, -1, 9 * 91)
    mean, std = logits.mean(dim=(0, 1)), logits.std(dim=(0, 1))
    cls.weight.div_(std[:, None, None, None])
    cls.bias.copy_(-mean / std + float(np.log(0.05 / 0.95)) - float(torch.distributions.Normal(0, 1).icdf(
        torch.tensor(1 - 1 / 8000))))
    box.weight.mul_(0.3 / head['bbox_regression'].std())
  return Reference(model, images, sd_numpy(model))


def uint8_images() -> list[np.ndarray]:
  """Three uint8 RGB images at the test size already (so neither side resizes): 256x320, 256x384, 200x384."""
  rng = np.random.default_rng(3)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((256, 320), (256, 384), (200, 384))]


def tv_config():
  c = torchvision_retinanet_r50.get_config()
  c.data.test_min_size = 256
  c.data.test_max_size = 384
  return c


@pytest.fixture(scope='module')
def converted(reference):
  return tvc.retinanet_variables(reference.state_dict)


def test_retinanet_features_heads_and_detections_match_torchvision(reference, converted):
  """On torchvision's own batch (3 images resized and padded by its transform): P3-P7, cls logits and box deltas
  to 1e-4 relative, and the final detections (in original image pixels): same classes, boxes within 1e-2 px,
  scores within 1e-4."""
  tv = reference.model
  with torch.no_grad():
    batch, _ = tv.transform(reference.images)
    features = tv.backbone(batch.tensors)
    head = tv.head(list(features.values()))
    want_dets = tv(reference.images)
  assert tuple(batch.tensors.shape[-2:]) == (256, 384)
  config = tv_config()
  model, _ = rm.build_model(config)
  sizes = np.asarray(batch.image_sizes, np.int32)

  @jax.jit
  def forward(variables, x, image_size):
    out = model.apply(variables, x)
    return out, step_lib.detect(config, out['cls_logits'], out['box_deltas'], image_size, x.shape[1:3])

  out, dets = jax.device_get(forward(converted, jnp.asarray(nhwc(batch.tensors)), jnp.asarray(sizes)))
  for name, level in zip(features, range(3, 8)):
    err = relative_error(out['features'][level], nhwc(features[name]))
    print(f'P{level}: max rel err {err:.2e}')
    assert err < RTOL, (name, err)
  for ours, theirs in (('cls_logits', 'cls_logits'), ('box_deltas', 'bbox_regression')):
    err = relative_error(out[ours], head[theirs].numpy())
    print(f'{ours}: max rel err {err:.2e}, max abs err {np.abs(out[ours] - head[theirs].numpy()).max():.2e}')
    assert err < RTOL, (ours, err)
  for i, want in enumerate(want_dets):
    (h, w), (oh, ow) = sizes[i], reference.images[i].shape[1:]
    valid = dets['valid'][i]
    # torchvision's transform.postprocess: boxes * (original / resized) per axis.
    boxes = dets['boxes'][i][valid] * np.array([ow / w, oh / h, ow / w, oh / h], np.float32)
    check_detections(boxes, dets['scores'][i][valid], dets['classes'][i][valid], want, f'image {i}')


def _match(boxes, classes, want_boxes, want_labels):
  """For each of our detections, the index of torchvision's with the same class and the nearest box."""
  dist = np.abs(want_boxes[None, :, :] - boxes[:, None, :]).max(-1)
  dist[classes[:, None] != want_labels[None, :]] = np.inf
  return np.argmin(dist, axis=1)


def check_detections(boxes, scores, classes, want, what):
  n = len(want['scores'])
  assert 20 <= n, f'{what}: only {n} detections; the test needs more to mean something'
  assert len(scores) == n, (what, len(scores), n)
  want_boxes, want_scores, want_labels = want['boxes'].numpy(), want['scores'].numpy(), want['labels'].numpy()
  # Detections whose scores tie to float32 rounding may come out of either side's sort in either order (measured:
  # 2 pairs of 300 swapped on a Zen 3 CPU). Match them by class and box; a swap is allowed only between near-ties.
  perm = _match(boxes, classes - 1, want_boxes, want_labels)  # our class k = label k - 1
  assert len(set(perm.tolist())) == n, f'{what}: detections without a counterpart'
  moved = perm != np.arange(n)
  assert np.all(np.abs(scores[moved] - want_scores[moved]) < 1e-4), (what, np.flatnonzero(moved))
  assert moved.sum() <= n // 50, (what, moved.sum())
  want_boxes, want_scores, want_labels = want_boxes[perm], want_scores[perm], want_labels[perm]
  np.testing.assert_array_equal(classes - 1, want_labels, err_msg=what)
  box_err = np.abs(boxes - want_boxes).max()
  score_err = np.abs(scores - want_scores).max()
  print(f'{what}: {n} detections, max box err {box_err:.2e} px, max score err {score_err:.2e}')
  assert box_err < 1e-2 and score_err < 1e-4, (what, box_err, score_err)


def test_detector_on_uint8_images_matches_torchvision(reference, converted):
  """End to end from uint8 images: `Detector.predict` with configs/torchvision_retinanet_r50.py (its normalization,
  anchors, coder, thresholds, NMS, 300 per image) vs torchvision's model(images / 255), each image on its own
  canvas (its sides rounded up to 32 on both sides: 256 x 320, 256 x 384, 224 x 384)."""
  from retinamask_jax.export import Detector

  config = tv_config()
  model, _ = rm.build_model(config)
  detector = Detector(model, config, converted)
  images = uint8_images()
  got = detector.predict(images, batch_size=3)
  tv = reference.model
  for i, image in enumerate(images):
    with torch.no_grad():
      want = tv([torch.from_numpy(image).permute(2, 0, 1) / 255.0])[0]
    r = got[i]
    check_detections(r['boxes'], r['scores'], r['classes'], want, f'uint8 image {i}')
    perm = _match(r['boxes'], r['classes'] - 1, want['boxes'].numpy(), want['labels'].numpy())
    assert r['category_ids'].tolist() == want['labels'].numpy()[perm].tolist()  # category id = torchvision label
    assert r['names'][:3] == [torchvision_retinanet_r50.COCO_CATEGORIES[k] for k in want['labels'][:3].tolist()]


def test_legacy_key_layout_converts_the_same(reference, converted):
  """torchvision's pre-v2 RetinaNet checkpoints name FPN blocks `inner_blocks.i.weight` and head convs `conv.{2i}`."""
  legacy = {}
  for key, value in reference.state_dict.items():
    key = key.replace('.0.weight', '.weight').replace('.0.bias', '.bias') if '.fpn.' in key else key
    if '_head.conv.' in key:
      head, rest = key.split('_head.conv.')
      index, leaf = rest.split('.0.')
      key = f'{head}_head.conv.{2 * int(index)}.{leaf}'
    legacy[key] = value
  assert 'backbone.fpn.inner_blocks.0.weight' in legacy and 'head.regression_head.conv.6.bias' in legacy
  got = tvc.retinanet_variables(legacy)
  assert jax.tree.all(jax.tree.map(np.array_equal, got, converted))


def test_retinanet_config_reproduces_torchvision_settings(reference):
  tv, c = reference.model, torchvision_retinanet_r50.get_config()
  assert c.postprocess.score_threshold == tv.score_thresh and c.postprocess.nms_iou == tv.nms_thresh
  assert c.postprocess.max_detections == tv.detections_per_img and c.postprocess.pre_nms_top_k == tv.topk_candidates
  assert tuple(c.model.box_coder.weights) == tuple(tv.box_coder.weights)
  assert c.model.box_coder.max_log_ratio == pytest.approx(tv.box_coder.bbox_xform_clip)
  assert tuple(c.data.pixel_mean) == tuple(tv.transform.image_mean)
  assert tuple(c.data.pixel_std) == tuple(tv.transform.image_std)
  assert (c.data.test_min_size, c.data.test_max_size) == (800, 1333)  # torchvision's defaults
  assert c.model.num_classes == tv.head.classification_head.num_classes == len(c.model.class_names)
  assert tvc.retinanet_num_classes(reference.state_dict) == (91, 9)


# ------------------------------------------------------------------------------------------------ bad input


def test_other_detector_names_the_first_missing_or_mismatched_key():
  """Faster R-CNN: no RetinaNet head, and its FPN starts at C2 (256 channels), not at C3 (512)."""
  torch.manual_seed(0)
  sd = sd_numpy(torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None))
  with pytest.raises(tvc.ConversionError, match=r"has no key 'head\.regression_head\.bbox_reg\.weight'"):
    tvc.retinanet_variables(sd)
  sd['head.classification_head.cls_logits.weight'] = np.zeros((9 * 91, 256, 3, 3), np.float32)
  sd['head.regression_head.bbox_reg.weight'] = np.zeros((36, 256, 3, 3), np.float32)
  with pytest.raises(tvc.ConversionError, match=r"key 'backbone\.fpn\.inner_blocks\.0\.0\.weight' has shape "
                                                 r'\(256, 256, 1, 1\), expected \(256, 512, 1, 1\)'):
    tvc.retinanet_variables(sd)


def test_retinanet_v2_names_the_first_mismatch():
  """retinanet_resnet50_fpn_v2 (P6 from C5, GN heads without conv bias) is another architecture."""
  torch.manual_seed(0)
  sd = sd_numpy(torchvision.models.detection.retinanet_resnet50_fpn_v2(weights=None, weights_backbone=None))
  with pytest.raises(tvc.ConversionError, match=r"'backbone\.fpn\.extra_blocks\.p6\.weight' has shape "
                                                 r'\(256, 2048, 3, 3\), expected \(256, 256, 3, 3\)'):
    tvc.retinanet_variables(sd)


def test_resnet_mismatches_are_named():
  torch.manual_seed(0)
  sd18 = sd_numpy(torchvision.models.resnet18(weights=None))
  with pytest.raises(tvc.ConversionError, match=r"ResNet-50: key 'layer1\.0\.conv1\.weight' has shape "
                                                 r'\(64, 64, 3, 3\), expected \(64, 64, 1, 1\)'):
    tvc.resnet_variables(sd18, architecture=tvc.ResNetArchitecture(50))
  bad = dict(sd18, **{'layer2.0.conv2.weight': np.zeros((128, 64, 3, 3), np.float32)})
  with pytest.raises(tvc.ConversionError, match=r"'layer2\.0\.conv2\.weight' has shape \(128, 64, 3, 3\), expected "
                                                 r'\(128, 128, 3, 3\)'):
    tvc.resnet_variables(bad)
  with pytest.raises(tvc.ConversionError, match=r"unexpected key 'layer4\.2\.conv1\.weight'"):
    tvc.resnet_variables(dict(sd18, **{'layer4.2.conv1.weight': np.zeros((3,), np.float32)}),
                         architecture=tvc.ResNetArchitecture(18))
  mobilenet = sd_numpy(torchvision.models.mobilenet_v2(weights=None))
  with pytest.raises(tvc.ConversionError, match=r"no key 'conv1\.weight'"):
    tvc.resnet_variables(mobilenet)


def test_pickles_that_are_not_plain_tensors_are_refused(tmp_path):
  model_file, strings_file, good_file = (str(tmp_path / n) for n in ('model.pth', 'strings.pth', 'good.pth'))
  torch.save(torch.nn.Linear(2, 3), model_file)  # a whole module object, not a state dict
  with pytest.raises(tvc.ConversionError, match='not a state dict of plain tensors; torch.load\\(weights_only=True\\)'):
    tvc.load_state_dict(model_file)
  torch.save({'conv1.weight': torch.zeros(2), 'note': 'hello'}, strings_file)
  with pytest.raises(tvc.ConversionError, match="entry 'note' is a str"):
    tvc.load_state_dict(strings_file)
  torch.save({'model': {'a': torch.ones(2, dtype=torch.float16)}}, good_file)  # a training checkpoint's wrapper
  loaded = tvc.load_state_dict(good_file)
  assert list(loaded) == ['a'] and loaded['a'].dtype == np.float32


# ------------------------------------------------------------------------------------------------ command, training


def test_command_writes_a_detector_export(reference, converted, tmp_path):
  from retinamask_jax.export import Detector

  pth = str(tmp_path / 'retinanet.pth')
  torch.save(reference.model.state_dict(), pth)
  assert tvc.main(['--in', pth, '--out', str(tmp_path / 'out')]) == 0
  detector = Detector.from_checkpoint(str(tmp_path / 'out'))
  assert detector.config.model.anchors.preset == 'torchvision' and detector.config.model.num_classes == 91
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(detector.variables), converted))


def _resnet18_pth(tmp_path) -> str:
  """A ResNet-18 whose BN statistics are those of (random) data, as in a trained checkpoint: activations keep a
  sane scale through the frozen backbone."""
  torch.manual_seed(0)
  model = torchvision.models.resnet18(weights=None)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.momentum = None  # cumulative average over the batches below
  model.train()
  with torch.no_grad():
    model(torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
  model.eval()
  path = str(tmp_path / 'resnet18.pth')
  torch.save(model.state_dict(), path)
  return path


def test_command_line_converts_a_resnet_and_reports_bad_input(tmp_path):
  """`python -m retinamask_jax.convert.torchvision` in a subprocess: exit 0 and the backbone files; exit 2 with a
  one-line reason for a file that is not a state dict."""
  pth = _resnet18_pth(tmp_path)
  cmd = [sys.executable, '-m', 'retinamask_jax.convert.torchvision', '--in', pth, '--out', str(tmp_path / 'r18')]
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  assert 'ResNet-18' in done.stdout
  assert os.path.exists(tmp_path / 'r18' / 'backbone.json') and os.path.isdir(tmp_path / 'r18' / 'variables')
  torch.save(torch.nn.Linear(2, 3), str(tmp_path / 'module.pth'))
  cmd[4], cmd[6] = str(tmp_path / 'module.pth'), str(tmp_path / 'bad')
  done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 2
  assert done.stderr.strip().splitlines()[-1].startswith('error: ') and 'weights_only' in done.stderr


def backbone_init_config(path: str, depth: int = 18):
  c = tiny.get_config()
  c.model.num_classes = 3
  c.model.backbone.depth = depth
  c.model.backbone.base_width = 64  # torchvision's width
  c.model.backbone.norm = 'frozen_bn'
  c.model.backbone.freeze_at = 2
  c.model.backbone.stride_in_1x1 = False
  c.model.backbone_init = path
  c.model.mask.enabled = False  # not needed here; halves the compile time
  return c


@pytest.mark.slow  # ~70 s; tests/test_torchvision_training.py trains converted weights against torchvision by default
def test_backbone_init_trains_from_converted_weights(tmp_path):
  """A converted ResNet-18 in `model.backbone_init`: the fresh state holds its weights, a fresh optimizer state,
  and a few train steps run (finite loss), move res3-res5 and leave the frozen stem / res2 alone."""
  from retinamask_jax.data import coco as coco_lib
  from retinamask_jax.data import pipeline, shapes
  from retinamask_jax.train import loop

  pth = _resnet18_pth(tmp_path)
  assert tvc.main(['--in', pth, '--out', str(tmp_path / 'r18')]) == 0
  expected = tvc.resnet_variables(tvc.load_state_dict(pth))
  c = backbone_init_config(str(tmp_path / 'r18'))
  model, init = rm.build_model(c)
  state = loop.create_train_state(c, model, init, jax.random.key(0))
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state.params['backbone']), expected['params']))
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(state.frozen['backbone']), expected['frozen']))
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state) if jnp.ndim(x) > 0)
  # A .pth in backbone_init is converted on the fly, to the same variables.
  from_pth = init_backbone(jax.eval_shape(lambda r: init(r, (128, 128)), jax.random.key(0)), backbone_init_config(pth))
  assert jax.tree.all(jax.tree.map(np.array_equal, from_pth['params']['backbone'], expected['params']))
  json_path, images = shapes.write_shapes_dataset(str(tmp_path), 'train', 4, image_size=(96, 128), seed=3)
  ds = coco_lib.load_coco(json_path, images)
  batch = next(pipeline.make_train_iterator(ds, c, global_batch_size=2, num_workers=0))
  batch = {k: batch[k] for k in loop.TRAIN_KEYS}
  train_step = jax.jit(step_lib.make_train_step(model, c))
  start = state
  for i in range(3):
    state, metrics = train_step(state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics['loss'])) and float(metrics['nonfinite']) == 0
  moved = lambda name: float(jnp.abs(state.params['backbone'][name]['block0']['conv1']['kernel']
                                     - start.params['backbone'][name]['block0']['conv1']['kernel']).max())
  assert moved('res2') == 0 and moved('res4') > 0
  assert float(jnp.abs(state.params['backbone']['stem']['conv']['kernel']
                       - start.params['backbone']['stem']['conv']['kernel']).max()) == 0


def test_backbone_init_mismatch_names_the_key_and_shapes(tmp_path):
  pth = _resnet18_pth(tmp_path)
  c = backbone_init_config(pth, depth=34)
  model, init = rm.build_model(c)
  variables = jax.eval_shape(lambda r: init(r, (128, 128)), jax.random.key(0))
  with pytest.raises(BackboneInitError, match=r'at params/backbone/res2/block2/conv1/kernel the converted backbone '
                                              r'has no entry, the model expects shape \(3, 3, 64, 64\)'):
    init_backbone(variables, c)
  c = backbone_init_config(pth)
  c.model.backbone.base_width = 16
  model, init = rm.build_model(c)
  variables = jax.eval_shape(lambda r: init(r, (128, 128)), jax.random.key(0))
  with pytest.raises(BackboneInitError, match=r'has shape \(3, 3, 64, 64\), the model expects shape \(3, 3, 16, 16\)'):
    init_backbone(variables, c)


def test_backbone_init_refuses_msra_stride_with_torchvision_weights(tmp_path):
  torch.manual_seed(0)
  sd = sd_numpy(torchvision.models.resnet50(weights=None))
  tvc.save_backbone(str(tmp_path / 'r50'), tvc.resnet_variables(sd), tvc.resnet_architecture(sd))
  c = backbone_init_config(str(tmp_path / 'r50'), depth=50)
  c.model.backbone.stride_in_1x1 = True
  with pytest.raises(BackboneInitError, match='stride_in_1x1=False'):
    init_backbone({'params': {'backbone': {}}, 'frozen': {'backbone': {}}}, c)


@pytest.mark.slow
def test_converted_retinanet_trains_with_a_fresh_optimizer(reference, converted, tmp_path):
  """The converted torchvision RetinaNet, optimizer state created fresh, trains a few steps on 256 x 384 canvases."""
  from retinamask_jax.data import coco as coco_lib
  from retinamask_jax.data import pipeline, shapes
  from retinamask_jax.train import loop
  from retinamask_jax.train.state import TrainState

  c = tv_config()
  c.data.min_sizes = (256,)
  c.data.max_size = 384
  c.data.max_instances = 16
  c.data.num_workers = 0
  c.train.batch_size = 1
  model, init = rm.build_model(c)
  fresh = loop.create_train_state(c, model, init, jax.random.key(0))
  variables = dict(converted, loss_stats=fresh.loss_stats)
  state = TrainState.create(variables, fresh.tx, fresh.hparams)
  json_path, images = shapes.write_shapes_dataset(str(tmp_path), 'train', 2, image_size=(256, 384), seed=3)
  ds = coco_lib.load_coco(json_path, images)
  batch = next(pipeline.make_train_iterator(ds, c, global_batch_size=1, num_workers=0))
  batch = {k: batch[k] for k in loop.TRAIN_KEYS}
  train_step = jax.jit(step_lib.make_train_step(model, c))
  for i in range(2):
    state, metrics = train_step(state, batch, jax.random.key(i))
    assert np.isfinite(float(metrics['loss'])) and float(metrics['nonfinite']) == 0
  assert int(state.step) == 2

"""The training half against torchvision itself: anchor matching, regression targets, the loss, every trainable
gradient and three SGD steps of a torchvision RetinaNet converted to this repository, on the same image and GT.

torchvision's side: `RetinaNet` in train mode (ResNet-18-FPN built with its own `_resnet_fpn_extractor` at 256 x 256,
or `retinanet_resnet50_fpn` at 768 x 768, slow), seeded random weights, random BN statistics held fixed (BN layers
in eval mode, their affine not trained: what `FrozenBatchNorm2d` does), conv1 and layer1 frozen
(trainable_backbone_layers=3), its class predictor rescaled so that scores spread (tests/tv_reference.py). Its
transform is made the identity (mean 0, std 1, min_size = max_size = the image size) and it is given the normalized
image ours gets, so both see the same input tensor.

Ours: `convert.torchvision.retinanet_variables`, configs/torchvision_retinanet_r50.py (torchvision's
Matcher(0.5, 0.4, allow_low_quality_matches=True) is `best_match_threshold` 0.0), the fixed smooth L1 with beta
1e-9 (torchvision's L1 loss), and the traced loss weights that undo the normalizer difference, which stays as the
authors' choice: ours divides the focal loss by (num_pos + N) and the box loss by 4 max(num_pos, 1), torchvision
by max(num_pos, 1) each (one image), so cls_weight = (P + 1) / P and box_weight = 4.

Gradients are judged against torchvision run in float64: per tensor, err(g) = max |g - g64| / max |g64|. Ours must
be within a small multiple of torchvision float32's own err (see GRAD_FACTOR for why it may exceed it).

Both networks run with SiLU where they have ReLU (`smooth_activation`: flax.linen.relu and torch's
functional.relu, which nn.ReLU calls). ReLU's derivative jumps at 0: a pre-activation within float32 rounding of 0
falls on one side in one program and on the other in a program that sums in another order (or in float64), and that
one unit then moves the gradient of every layer below it. Such a flip is not an error of either program, yet it
decides these comparisons. Measured on R18-FPN 256 x 256 (2026-12-08, 2 AMD EPYC cores without AVX-512): ours in
float32 against the same program in float64 is off by 3.4e-3 on the head's cls_tower_1 bias, all of it in one
channel (226; the other 255 channels within 3.2e-7), and by ~1e-3 on everything below it on the P4 path (FPN
lateral4 / output4, backbone res3-res5), the same pattern against torchvision float64; on the 2026-12-07 machine
(AVX-512) the same test had no flip and passed with ReLU. With SiLU the worst tensor is 3.6e-6 (torchvision float32
2.0e-5) and the worst ratio to torchvision float32 1.8. ReLU's forward pass is held to torchvision's by
tests/test_predict_parity.py (detections to 1e-3 px).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torchvision = pytest.importorskip('torchvision')

import tv_reference  # noqa: E402

from configs import torchvision_retinanet_r50  # noqa: E402
from retinamask_jax.convert import torchvision as tvc  # noqa: E402
from retinamask_jax.hparams import HParams  # noqa: E402
from retinamask_jax.models import retinamask as rm  # noqa: E402
from retinamask_jax.ops import boxes as box_ops  # noqa: E402
from retinamask_jax.ops.matching import match_anchors  # noqa: E402
from retinamask_jax.train import loop  # noqa: E402
from retinamask_jax.train import step as step_lib  # noqa: E402
from retinamask_jax.train.state import TrainState  # noqa: E402

NUM_CLASSES = 5
# With the rescaled (large) class predictor a step of 1e-3 is already violent: 3 such steps amplify float32
# rounding to ~1e-4 of the parameters on both sides alike (torchvision float32 vs float64 too); at 1e-4 the
# parameters move by up to ~1e-2 of their magnitude and all three sides stay within ~1e-5 of each other.
LR = 1e-4
STEPS = 3
DETECTION_THRESHOLD = 1e-3
DETECTIONS_COMPARED = 50


@dataclasses.dataclass
class Setup:
  model: object  # torchvision RetinaNet, train mode, BN held
  image: np.ndarray  # float32 [H, W, 3], normalized
  boxes: np.ndarray  # float32 [n, 4]
  labels: np.ndarray  # int64 [n], torchvision labels 0..K-1 (ours: + 1)
  config: object


def gt_boxes(size: int) -> tuple[np.ndarray, np.ndarray]:
  """GT with ties on purpose: a 10 x 10 box inside many equal 32 x 32 anchors (a low-quality best match tied over
  several anchors), a 32 x 32 box centred between two P3 anchor centres (two anchors tie at IoU 0.78), and random
  boxes of all scales."""
  rng = np.random.default_rng(size)
  boxes = [[95.0, 91.0, 105.0, 101.0], [84.0, 80.0, 116.0, 112.0]]
  for _ in range(6):
    w, h = rng.uniform(0.05, 0.7, 2) * size
    x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
    boxes.append([x, y, x + w, y + h])
  boxes = np.asarray(boxes, np.float32)
  labels = rng.integers(0, NUM_CLASSES, len(boxes)).astype(np.int64)
  return boxes, labels


def held_bn_train_mode(model) -> None:
  """Train mode with every BatchNorm2d using its fixed statistics and affine (FrozenBatchNorm2d's behaviour), and
  conv1 / layer1 frozen (trainable_backbone_layers=3; torchvision makes every layer trainable when it is built
  without pretrained weights, whatever that argument says)."""
  for name, p in model.backbone.body.named_parameters():
    if not name.startswith(('layer2.', 'layer3.', 'layer4.')):
      p.requires_grad_(False)
  model.train()
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      m.eval()
      m.weight.requires_grad_(False)
      m.bias.requires_grad_(False)


def make_setup(depth: int, size: int) -> Setup:
  rng = np.random.default_rng(depth)
  uint8 = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
  model = tv_reference.retinanet(depth, 0, [uint8], min_size=size, max_size=size, num_classes=NUM_CLASSES)
  model.transform.image_mean, model.transform.image_std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
  held_bn_train_mode(model)
  mean, std = np.asarray([0.485, 0.456, 0.406]), np.asarray([0.229, 0.224, 0.225])
  image = ((uint8 / 255.0 - mean) / std).astype(np.float32)
  boxes, labels = gt_boxes(size)
  c = torchvision_retinanet_r50.get_config()
  c.model.backbone.depth = depth
  c.model.num_classes = NUM_CLASSES
  c.model.category_ids = tuple(range(NUM_CLASSES))
  c.model.class_names = tuple(f'c{k}' for k in range(NUM_CLASSES))
  c.loss.beta = 1e-9
  c.data.min_sizes, c.data.max_size = (size,), size
  c.data.test_min_size = c.data.test_max_size = size
  c.data.max_instances = 16
  c.train.batch_size = 1
  c.train.lr_reference_batch = 1
  c.train.base_lr = LR
  c.train.warmup_steps = 0
  c.train.lr_steps = ()
  c.train.weight_decay = 0.0
  c.train.bias_lr_factor = 1.0
  c.train.momentum = 0.9
  return Setup(model, image, boxes, labels, c)


def tv_input(s: Setup, dtype=torch.float32):
  images = [torch.from_numpy(s.image).permute(2, 0, 1).to(dtype)]
  targets = [{'boxes': torch.from_numpy(s.boxes).to(dtype), 'labels': torch.from_numpy(s.labels)}]
  return images, targets


def tv_loss_and_grads(model, s: Setup, dtype) -> tuple[float, dict[str, np.ndarray]]:
  model.zero_grad()
  images, targets = tv_input(s, dtype)
  losses = model(images, targets)
  loss = losses['classification'] + losses['bbox_regression']
  loss.backward()
  grads = {k: p.grad.detach().double().numpy() for k, p in model.named_parameters() if p.grad is not None}
  return float(loss.detach()), grads


def batch_for(s: Setup) -> dict[str, jnp.ndarray]:
  g = s.config.data.max_instances
  gt = np.zeros((1, g, 4), np.float32)
  cls = np.zeros((1, g), np.int32)
  gt[0, : len(s.boxes)] = s.boxes
  cls[0, : len(s.boxes)] = s.labels + 1
  size = s.image.shape[0]
  return {
      'image': jnp.asarray(s.image[None]),
      'image_size': jnp.asarray([[size, size]], jnp.int32),
      'gt_boxes': jnp.asarray(gt),
      'gt_classes': jnp.asarray(cls),
      'gt_masks': jnp.zeros((1, g, 1, 1), jnp.uint8),
  }


def to_ours(state_dict_like: dict[str, np.ndarray], reference_sd: dict[str, np.ndarray]) -> dict:
  """torchvision tensors (parameters or their gradients, by name) -> our `params` tree through the converter.
  Parameters missing from `state_dict_like` (frozen: no gradient) are zeros; BN entries come from `reference_sd`
  (they only feed the `frozen` collection, which is not compared)."""
  sd = {}
  for k, v in reference_sd.items():
    bn = any(k.endswith(x) for x in ('running_mean', 'running_var', 'num_batches_tracked')) or (
        k.endswith(('.weight', '.bias')) and v.ndim == 1 and not k.startswith(('backbone.fpn', 'head')))
    sd[k] = np.asarray(state_dict_like[k] if k in state_dict_like else (v if bn else np.zeros_like(v)), np.float32)
  return tvc.retinanet_variables(sd)['params']


@contextlib.contextmanager
def smooth_activation():
  """SiLU in place of ReLU on both sides while the context is open (see the module docstring)."""
  import flax.linen as nn

  relu, torch_relu = nn.relu, torch.nn.functional.relu
  nn.relu = jax.nn.silu
  torch.nn.functional.relu = lambda x, inplace=False: torch.nn.functional.silu(x)
  try:
    yield
  finally:
    nn.relu, torch.nn.functional.relu = relu, torch_relu
    jax.clear_caches()  # nothing traced with SiLU outlives the context


def relative(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def run(depth: int, size: int) -> dict:
  """Everything the tests assert, measured once per setup."""
  s = make_setup(depth, size)
  model = s.model
  reference_sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  out: dict = {}

  # ---- matching and targets, against torchvision's own anchor generator, Matcher and BoxCoder
  images, targets = tv_input(s)
  with torch.no_grad():
    image_list, _ = model.transform(images, targets)
    features = list(model.backbone(image_list.tensors).values())
    anchors = model.anchor_generator(image_list, features)[0]
    iou = torchvision.ops.box_iou(targets[0]['boxes'], anchors)
    matched = model.proposal_matcher(iou).numpy()
  ours_anchors, _ = step_lib.canvas_anchors(s.config, (size, size))
  np.testing.assert_array_equal(ours_anchors, anchors.numpy())
  g = s.config.data.max_instances
  gt = np.zeros((g, 4), np.float32)
  gt[: len(s.boxes)] = s.boxes
  valid = np.arange(g) < len(s.boxes)
  matched_gt, labels = jax.device_get(jax.jit(lambda a, b, v: match_anchors(
      a, b, v, positive_iou=0.5, negative_iou=0.4, best_match_threshold=0.0))(ours_anchors, gt, valid))
  want_labels = np.where(matched >= 0, 1, np.where(matched == -1, 0, -1))
  out['label_mismatches'] = int((labels != want_labels).sum())
  pos = want_labels == 1
  out['matched_gt_mismatches'] = int((matched_gt[pos] != matched[pos]).sum())
  out['num_pos'] = int(pos.sum())
  out['tied_low_quality'] = int((iou[0] == iou[0].max()).sum())  # anchors tied as best for the 10 x 10 box
  want_targets = model.box_coder.encode_single(targets[0]['boxes'][matched[pos]], anchors[pos]).numpy()
  got_targets = np.asarray(box_ops.encode_boxes(jnp.asarray(gt[matched_gt[pos]]), jnp.asarray(ours_anchors[pos]),
                                                (1.0, 1.0, 1.0, 1.0)))
  out['target_err'] = float(np.abs(got_targets - want_targets).max())

  # ---- loss and gradients: torchvision f32 and f64, ours f32
  tv32_loss, tv32 = tv_loss_and_grads(model, s, torch.float32)
  model64 = copy.deepcopy(model).double()
  tv64_loss, tv64 = tv_loss_and_grads(model64, s, torch.float64)
  p = out['num_pos']
  hparams = HParams.from_config(s.config)
  hparams = dataclasses.replace(hparams, cls_weight=jnp.float32((p + 1) / p), box_weight=jnp.float32(4.0))
  c = s.config
  net, init = rm.build_model(c)
  variables = tvc.retinanet_variables(reference_sd)
  loss_stats = jax.eval_shape(lambda r: init(r, (size, size)), jax.random.key(0))['loss_stats']
  loss_stats = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), loss_stats)
  batch = batch_for(s)

  def loss_fn(params):
    return step_lib.compute_loss(net, c, params, variables['frozen'], loss_stats, hparams, batch)[0]

  ours_loss, ours_grads = jax.jit(jax.value_and_grad(loss_fn))(variables['params'])
  out['loss'] = {'ours': float(ours_loss), 'tv32': tv32_loss, 'tv64': tv64_loss}
  trainable = set(tv32)
  g32, g64 = to_ours(tv32, reference_sd), to_ours(tv64, reference_sd)
  ours_flat = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(ours_grads))[0])
  rows = {}
  for path, want in jax.tree_util.tree_flatten_with_path(g64)[0]:
    name = jax.tree_util.keystr(path)
    got = ours_flat[path]
    tv = dict(jax.tree_util.tree_flatten_with_path(g32)[0])[path]
    if np.abs(want).max() == 0:
      continue  # frozen (conv1, layer1): no gradient on either side
    rows[name] = (relative(got, want), relative(tv, want))
  out['grads'] = rows
  out['num_trainable'] = len(trainable)

  # ---- three SGD steps with momentum on both sides (and torchvision in float64, the reference)
  for net_tv, dtype in ((model, torch.float32), (model64, torch.float64)):
    opt = torch.optim.SGD([q for q in net_tv.parameters() if q.requires_grad], lr=LR, momentum=0.9)
    for _ in range(STEPS):
      opt.zero_grad()
      images, targets = tv_input(s, dtype)
      losses = net_tv(images, targets)
      (losses['classification'] + losses['bbox_regression']).backward()
      opt.step()
  fresh = loop.create_train_state(c, net, init, jax.random.key(0))
  state = TrainState.create(dict(variables, loss_stats=fresh.loss_stats), fresh.tx, hparams)
  train_step = jax.jit(step_lib.make_train_step(net, c))
  for i in range(STEPS):
    state, _ = train_step(state, batch, jax.random.key(i))
  after = to_ours({k: v.detach().numpy() for k, v in model.named_parameters()}, reference_sd)
  after64 = to_ours({k: v.detach().numpy() for k, v in model64.named_parameters()}, reference_sd)
  flat = lambda tree: dict(jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0])  # noqa: E731
  before, ours_after, tv_after, tv64_after = flat(variables['params']), flat(state.params), flat(after), flat(after64)
  param_rows = {}
  for path, want in tv_after.items():
    moved = np.abs(np.float64(want) - before[path]).max()
    scale = np.abs(before[path]).max()
    if moved <= 1e-5 * scale or scale == 0:
      # Not moved, or moved by float32 rounding only (a gradient that is ~0 up to rounding; its sign differs between
      # programs), or zero at the start (the predictors' biases): relative errors are meaningless there, and the
      # absolute ones are covered by the tensors that did move.
      continue
    # (ours vs torchvision f32, relative to the parameter; ours and torchvision f32 vs torchvision f64, relative to
    # how far the parameter moved)
    got, ref = ours_after[path], np.float64(tv64_after[path])
    param_rows[jax.tree_util.keystr(path)] = (
        relative(got, want), float(np.abs(got - ref).max() / moved), float(np.abs(want - ref).max() / moved),
        float(moved / scale))
  out['params'] = param_rows

  # ---- detections after the steps: torchvision's best DETECTIONS_COMPARED, each to be found among ours. The steps
  # lower most scores (and SiLU spreads them less than ReLU did), so both sides keep everything above 1e-3 (at most
  # 100 per image) rather than 0.05; comparing only torchvision's top ones keeps a near-tie at its 100th place out.
  model.eval()
  model64.eval()
  model.score_thresh = model64.score_thresh = DETECTION_THRESHOLD
  c.postprocess.score_threshold = DETECTION_THRESHOLD
  with torch.no_grad():
    want = model([torch.from_numpy(s.image).permute(2, 0, 1)])[0]
    want64 = model64([torch.from_numpy(s.image).permute(2, 0, 1).double()])[0]
  want = {k: v.numpy()[:DETECTIONS_COMPARED] for k, v in want.items()}  # torchvision sorts by score
  want64 = {k: v.numpy()[:DETECTIONS_COMPARED] for k, v in want64.items()}

  @jax.jit
  def detect(params, x):
    o = net.apply({'params': params, 'frozen': variables['frozen']}, x)
    return step_lib.detect(c, o['cls_logits'], o['box_deltas'], jnp.asarray([[size, size]], jnp.int32),
                           (size, size))

  d = jax.device_get(detect(state.params, batch['image']))
  v = d['valid'][0]
  ours = {'boxes': d['boxes'][0][v], 'scores': d['scores'][0][v], 'category_ids': d['classes'][0][v] - 1}
  out['detections'] = (len(want['scores']),) + tv_reference.matched_fraction(ours, want)
  # The bound float32 itself sets: torchvision float32's own detections against its float64 run, and ours there.
  tv32 = dict(want, category_ids=want['labels'])
  out['detections_vs_tv64'] = {
      'count': len(want64['scores']),
      'tv32': tv_reference.matched_fraction(tv32, want64)[0],
      'ours': tv_reference.matched_fraction(ours, want64)[0],
  }
  return out


def report(out: dict, what: str) -> None:
  print(f'\n{what}: {out["num_pos"]} positives, label mismatches {out["label_mismatches"]}, matched-GT mismatches '
        f'{out["matched_gt_mismatches"]}, {out["tied_low_quality"]} anchors tied for the 10x10 box, '
        f'target max abs err {out["target_err"]:.2e}')
  print(f'loss ours {out["loss"]["ours"]:.7f} tv32 {out["loss"]["tv32"]:.7f} tv64 {out["loss"]["tv64"]:.7f}')
  worst = sorted(out['grads'].items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-12))[-8:]
  for name, (ours, tv) in worst:
    print(f'  grad {name}: ours {ours:.2e}, tv32 {tv:.2e}, ratio {ours / max(tv, 1e-12):.1f}')
  print(f'  grads: max err ours {max(o for o, _ in out["grads"].values()):.2e}, '
        f'tv32 {max(t for _, t in out["grads"].values()):.2e} over {len(out["grads"])} tensors')
  rows = out['params'].values()
  print(f'  params after {STEPS} steps (lr {LR}): ours vs tv32 max rel err {max(r[0] for r in rows):.2e}; vs tv64, '
        f'relative to the update: ours {max(r[1] for r in rows):.2e}, tv32 {max(r[2] for r in rows):.2e}; '
        f'largest update / parameter {max(r[3] for r in rows):.2e}')
  worst = sorted(out['params'].items(), key=lambda kv: kv[1][1] / max(kv[1][2], 1e-12))[-6:]
  for name, (_, ours64, tv64, moved) in worst:
    print(f'  param {name}: vs tv64 ours {ours64:.2e}, tv32 {tv64:.2e}, ratio {ours64 / max(tv64, 1e-12):.1f}, '
          f'update / parameter {moved:.1e}')
  print(f'  detections after: {out["detections"]}; against torchvision float64: {out["detections_vs_tv64"]}')


# Ours within this multiple of torchvision float32's own error against float64 (or 1e-5 of the largest entry).
# Measured with SiLU (2026-12-08): at most 1.8x on R18-FPN 256x256 and 3.5x on R50-FPN 768x768 (a bias at 1.1e-6
# where torchvision float32 is at 3.2e-7), ours' worst tensor at 3.6e-6 (R18; torchvision float32 2.0e-5) and 1.0e-4
# (R50; torchvision float32 5.6e-5).
GRAD_FACTOR = 4.0


def check_first_step(out: dict) -> None:
  """Matching, targets, loss and every trainable gradient on the converted weights."""
  assert out['label_mismatches'] == 0 and out['matched_gt_mismatches'] == 0
  assert out['tied_low_quality'] >= 2 and out['num_pos'] > 0
  assert out['target_err'] < 1e-5
  loss = out['loss']
  assert abs(loss['ours'] - loss['tv64']) <= 1e-5 * loss['tv64']
  assert len(out['grads']) == out['num_trainable']
  for name, (ours, tv) in out['grads'].items():
    assert ours <= max(GRAD_FACTOR * tv, 1e-5), (name, ours, tv)


def check_after_steps(out: dict) -> None:
  """Parameters after the SGD steps (1e-4 relative to torchvision float32's; against float64, relative to the
  update, within GRAD_FACTOR of torchvision float32's distance), then the detections."""
  for name, (rel, ours64, tv64, _) in out['params'].items():
    assert rel < 1e-4, (name, rel)
    assert ours64 <= max(GRAD_FACTOR * tv64, 1e-3), (name, ours64, tv64)
  count, frac, _, _ = out['detections']
  assert count >= 20 and frac >= 0.99, out['detections']


def test_resnet18_fpn_training_matches_torchvision():
  with smooth_activation():
    out = run(18, 256)
  report(out, 'R18-FPN 256x256')
  check_first_step(out)
  check_after_steps(out)


@pytest.fixture(scope='module')
def r50() -> dict:
  with smooth_activation():
    out = run(50, 768)
  report(out, 'R50-FPN 768x768')
  return out


@pytest.mark.slow
def test_resnet50_fpn_training_matches_torchvision(r50):
  check_first_step(r50)
  for name, (rel, _, _, _) in r50['params'].items():
    assert rel < 1e-4, (name, rel)


@pytest.mark.slow
def test_resnet50_fpn_after_three_steps_matches_torchvision(r50):
  check_after_steps(r50)

"""Tests for retinamask_jax.models: layers, ResNet, FPN, heads and the RetinaMask module.

References are torchvision modules with weights copied over (a small private converter below maps
torchvision state-dict names onto ours, which is also what the parameter-shape tests check), PyTorch's
documented formulas written out in numpy float64, and hand-computed shapes.
"""

from __future__ import annotations

import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from conftest import requires_torchvision
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import base
from retinamask_jax.models import fpn as fpn_lib
from retinamask_jax.models import heads, layers
from retinamask_jax.models import resnet as resnet_lib
from retinamask_jax.models import retinamask as rm

# ------------------------------------------------------------------------------------------------ helpers


def tiny_config(**model_overrides):
  """A full experiment config with a slim ResNet-18 and narrow FPN / heads (fast on 2 CPU cores)."""
  c = base.get_config()
  c.model.num_classes = 3
  c.model.backbone.depth = 18
  c.model.backbone.base_width = 8
  c.model.fpn.channels = 16
  c.model.head.width = 16
  c.model.head.depth = 2
  c.model.mask.head_width = 16
  c.model.mask.head_depth = 2
  for key, value in model_overrides.items():
    node = c.model
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def init_module(module, images, rois=None, seed=0):
  return module.init(jax.random.key(seed), images, rois, method=rm.RetinaMask.init_all)


def variable_shapes(module, images, rois=None):
  """The variables' ShapeDtypeStructs, without running (or compiling) the init."""
  return jax.eval_shape(functools.partial(init_module, module), images, rois)


def random_like(shapes, seed: int = 0):
  """Variables of the given structure filled from numpy (no init compile): He-scaled kernels, nonzero biases,
  norm scales near 1. Initialisation itself is tested separately on small modules and in build_model."""
  rng = np.random.default_rng(seed)

  def fill(path, s):
    name = str(getattr(path[-1], 'key', path[-1]))
    if name == 'kernel':
      fan_in = int(np.prod(s.shape[:-1]))
      return (rng.standard_normal(s.shape) * math.sqrt(2.0 / fan_in)).astype(np.float32)
    if name == 'scale':
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, static_argnums=0)
def apply_jit(module, variables, images):
  """module.apply under jit; equal modules (hashable attributes) share the compilation."""
  return module.apply(variables, images)


@functools.partial(jax.jit, static_argnums=0)
def mask_logits_jit(module, variables, rois):
  return module.apply(variables, rois, method=rm.RetinaMask.mask_logits)


def model_vars(variables):
  return {k: variables[k] for k in ('params', 'frozen') if k in variables}


def flat(tree) -> dict[str, np.ndarray]:
  """{'a/b/c': leaf} for a nested dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    out['/'.join(str(getattr(p, 'key', p)) for p in path)] = leaf
  return out


def unflatten(items: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for key, value in items.items():
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


# torchvision state-dict name -> our 'collection/path/leaf' (None = not a variable here: BN statistics, fc).
_TV_RULES = [
    (r'conv1\.weight$', 'params/{p}stem/conv/kernel'),
    (r'bn1\.(weight|bias)$', 'frozen/{p}stem/norm/{bn}'),
    (r'layer(\d)\.(\d+)\.conv(\d)\.weight$', 'params/{p}res{L}/block{j}/conv{k}/kernel'),
    (r'layer(\d)\.(\d+)\.bn(\d)\.(weight|bias)$', 'frozen/{p}res{L}/block{j}/norm{k}/{bn}'),
    (r'layer(\d)\.(\d+)\.downsample\.0\.weight$', 'params/{p}res{L}/block{j}/downsample_conv/kernel'),
    (r'layer(\d)\.(\d+)\.downsample\.1\.(weight|bias)$', 'frozen/{p}res{L}/block{j}/downsample_norm/{bn}'),
]


def tv_backbone_name(key: str, prefix: str = '') -> str | None:
  if re.search(r'(running_mean|running_var|num_batches_tracked)$', key) or key.startswith('fc.'):
    return None
  bn_leaf = {'weight': 'scale', 'bias': 'bias'}
  for pattern, template in _TV_RULES:
    m = re.match(pattern, key)
    if not m:
      continue
    g = m.groups()
    fields = dict(p=prefix)
    if 'layer' in pattern:
      fields.update(L=int(g[0]) + 1, j=g[1])
      if 'conv(' in pattern or 'bn(' in pattern:
        fields['k'] = g[2]
    if '(weight|bias)' in pattern:
      fields['bn'] = bn_leaf[g[-1]]
    return template.format(**fields)
  raise KeyError(f'unmapped torchvision key {key}')


def tv_retinanet_name(key: str) -> str | None:
  if key.startswith('backbone.body.'):
    return tv_backbone_name(key[len('backbone.body.'):], prefix='backbone/')
  leaf = {'weight': 'kernel', 'bias': 'bias'}[key.rsplit('.', 1)[1]]
  rules = [
      (r'backbone\.fpn\.inner_blocks\.(\d)\.0\.', lambda g: f'fpn/lateral{int(g[0]) + 3}'),
      (r'backbone\.fpn\.layer_blocks\.(\d)\.0\.', lambda g: f'fpn/output{int(g[0]) + 3}'),
      (r'backbone\.fpn\.extra_blocks\.(p\d)\.', lambda g: f'fpn/{g[0]}'),
      (r'head\.classification_head\.conv\.(\d)\.0\.', lambda g: f'head/cls_tower_{g[0]}'),
      (r'head\.classification_head\.cls_logits\.', lambda g: 'head/cls_logits'),
      (r'head\.regression_head\.conv\.(\d)\.0\.', lambda g: f'head/box_tower_{g[0]}'),
      (r'head\.regression_head\.bbox_reg\.', lambda g: 'head/box_deltas'),
  ]
  for pattern, fn in rules:
    m = re.match(pattern, key)
    if m:
      return f'params/{fn(m.groups())}/{leaf}'
  raise KeyError(f'unmapped torchvision key {key}')


def torch_to_ours_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """OIHW conv weight -> HWIO kernel; vectors unchanged."""
  if len(shape) == 4:
    o, i, h, w = shape
    return (h, w, i, o)
  return tuple(shape)


def conv_weight(t) -> np.ndarray:
  return t.detach().numpy().transpose(2, 3, 1, 0)


def tv_to_variables(state_dict, name_fn, bn_eps: float = 1e-5) -> dict:
  """torchvision state dict -> our variables: conv OIHW -> HWIO, BN statistics folded into frozen scale/bias."""
  items = {}
  for key, t in state_dict.items():
    name = name_fn(key)
    if name is None:
      continue
    if name.startswith('frozen/') and name.endswith('/scale'):
      stem = key[: -len('weight')]
      scale = t.detach().numpy() / np.sqrt(state_dict[stem + 'running_var'].numpy() + bn_eps)
      items[name] = scale
      items[name[: -len('scale')] + 'bias'] = (
          state_dict[stem + 'bias'].detach().numpy() - state_dict[stem + 'running_mean'].numpy() * scale
      )
    elif name.startswith('frozen/'):
      continue  # the folded bias is written with its scale
    else:
      items[name] = conv_weight(t) if t.ndim == 4 else t.detach().numpy()
  return unflatten(items)


def randomize_bn_stats(model, seed: int = 0) -> None:
  import torch

  g = torch.Generator().manual_seed(seed)
  for m in model.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      with torch.no_grad():
        m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g))
        m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
        m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
  model.eval()


def nchw(x: np.ndarray):
  import torch

  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def nhwc(t) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def assert_close(actual, expected, rtol=1e-5, atol=1e-5):
  np.testing.assert_allclose(np.asarray(actual, np.float64), np.asarray(expected, np.float64), rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------------ layers


@settings(max_examples=15)
@given(
    k=st.sampled_from([1, 3, 7]),
    stride=st.integers(1, 3),
    pad=st.integers(0, 3),
    groups=st.sampled_from([1, 2]),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    as_matmul=st.booleans(),
)
def test_conv_matches_flax_conv(k, stride, pad, groups, h, w, as_matmul):
  """Our Conv == nn.Conv with explicit symmetric padding, from the same variables, with or without matmul."""
  if h + 2 * pad < k or w + 2 * pad < k:
    return
  x = np.random.default_rng(h * 100 + w).standard_normal((2, h, w, 4)).astype(np.float32)
  ours = layers.Conv(6, (k, k), stride, padding=pad, feature_group_count=groups, as_matmul=as_matmul)
  ref = nn.Conv(6, (k, k), stride, padding=((pad, pad), (pad, pad)), feature_group_count=groups)
  shapes = jax.eval_shape(ours.init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, shapes) == jax.tree.map(jnp.shape, jax.eval_shape(ref.init, jax.random.key(0), x))
  variables = random_like(shapes)
  assert_close(ours.apply(variables, x), ref.apply(variables, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('stride,size', [(1, (8, 8)), (2, (7, 9)), (3, (1, 5)), (2, (8, 8))])
def test_conv1x1_as_matmul_identical(stride, size):
  x = np.random.default_rng(0).standard_normal((2, *size, 5)).astype(np.float32)
  on = layers.Conv(7, (1, 1), stride, as_matmul=True)
  off = layers.Conv(7, (1, 1), stride, as_matmul=False)
  v_on, v_off = on.init(jax.random.key(3), x), off.init(jax.random.key(3), x)
  assert jax.tree.map(jnp.shape, v_on) == jax.tree.map(jnp.shape, v_off)
  jax.tree.map(np.testing.assert_array_equal, v_on, v_off)
  v = random_like(v_on)
  y_on, y_off = on.apply(v, x), off.apply(v, x)
  assert y_on.shape == y_off.shape == (2, -(-size[0] // stride), -(-size[1] // stride), 7)
  assert_close(y_on, y_off, rtol=1e-5, atol=1e-5)
  # The matmul path really is a matmul (no convolution in the program).
  assert 'convolution' not in jax.jit(on.apply).lower(v, x).as_text()
  assert 'convolution' in jax.jit(off.apply).lower(v, x).as_text()


@settings(max_examples=20, deadline=None)
@given(
    k=st.sampled_from([1, 2, 3, 7]),
    stride=st.integers(1, 3),
    pad=st.integers(0, 3),
    groups=st.sampled_from([1, 2, 4]),
    h=st.integers(1, 12),
    w=st.integers(1, 12),
    kernel_grad=st.sampled_from(layers.KERNEL_GRADS),
)
def test_conv_gradients_equal_the_float64_reference(k, stride, pad, groups, h, w, kernel_grad):
  """Every kernel-gradient path ('xla', 'taps': one matmul per tap, 'by_size': either) gives the gradients of the
  definition, for strides, paddings and groups, including windows that see only padding."""
  if h + 2 * pad < k or w + 2 * pad < k:
    return
  rng = np.random.default_rng(h * 1000 + w * 10 + k)
  x = rng.standard_normal((2, h, w, 8)).astype(np.float32)
  conv = layers.Conv(12, (k, k), stride, padding=pad, feature_group_count=groups, use_bias=False,
                     kernel_grad=kernel_grad)
  kernel = rng.standard_normal((k, k, 8 // groups, 12)).astype(np.float32)
  y = conv.apply({'params': {'kernel': kernel}}, x)
  g = rng.standard_normal(y.shape).astype(np.float32)
  grad_fn = jax.grad(lambda x_, k_: jnp.vdot(conv.apply({'params': {'kernel': k_}}, x_), g), argnums=(0, 1))
  dx, dk = jax.jit(grad_fn)(x, kernel)
  ref_dx, ref_dk = references.conv_grads(x, kernel, g, stride, pad, groups)
  assert_close(dx, ref_dx, rtol=1e-4, atol=1e-4)
  assert_close(dk, ref_dk, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('stride,size', [(1, (6, 7)), (2, (7, 9))])
def test_matmul_1x1_gradients_equal_the_float64_reference(stride, size):
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, *size, 5)).astype(np.float32)
  conv = layers.Conv(7, (1, 1), stride, use_bias=False, as_matmul=True)
  kernel = rng.standard_normal((1, 1, 5, 7)).astype(np.float32)
  g = rng.standard_normal(conv.apply({'params': {'kernel': kernel}}, x).shape).astype(np.float32)
  grad_fn = jax.grad(lambda x_, k_: jnp.vdot(conv.apply({'params': {'kernel': k_}}, x_), g), argnums=(0, 1))
  dx, dk = jax.jit(grad_fn)(x, kernel)
  ref_dx, ref_dk = references.conv_grads(x, kernel, g, stride, 0, 1)
  assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)
  assert_close(dk, ref_dk, rtol=1e-5, atol=1e-5)


def test_taps_kernel_grad_has_no_weight_gradient_convolution():
  """'taps' really replaces XLA's weight-gradient convolution: the backward program has only the forward and the
  input-gradient convolutions (2 per conv), 'xla' has 3."""
  x = np.ones((1, 8, 8, 4), np.float32)
  counts = {}
  for kernel_grad in layers.KERNEL_GRADS:
    conv = layers.Conv(4, (3, 3), padding=1, kernel_grad=kernel_grad)
    v = conv.init(jax.random.key(0), x)
    loss = lambda v_, x_, conv=conv: jnp.sum(conv.apply(v_, x_) ** 2)
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(v, x).as_text()
    counts[kernel_grad] = hlo.count('stablehlo.convolution')
  assert counts == {'xla': 3, 'taps': 2, 'by_size': 3}  # 'by_size': this conv is far below TAPS_MIN_FLOPS

  def by_size_convolutions(x_shape, features, groups=1):
    conv = layers.Conv(features, (3, 3), padding=1, feature_group_count=groups, kernel_grad='by_size')
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    v = jax.eval_shape(conv.init, jax.random.key(0), x)
    loss = lambda v_, x_: jnp.sum(conv.apply(v_, x_) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(v, x).as_text().count('stablehlo.convolution')

  # 2 * 4096 pixels * 9 * 256 * 256 = 4.8 GFLOP of kernel gradient: taps; 1/8 of the pixels (0.6 GFLOP): xla.
  assert by_size_convolutions((1, 64, 64, 256), 256) == 2
  assert by_size_convolutions((1, 16, 32, 256), 256) == 3
  assert by_size_convolutions((1, 8, 8, 8), 8, groups=4) == 2  # grouped: always taps


def test_conv_kernel_grad_auto_is_taps_on_cpu_and_checked():
  assert rm.resolve_conv_kernel_grad('auto') == ('by_size' if jax.default_backend() == 'cpu' else 'xla')
  assert rm.resolve_conv_kernel_grad('xla') == 'xla'
  with pytest.raises(ValueError, match='model.conv_kernel_grad'):
    rm.build_model(tiny_config(conv_kernel_grad='matmul'))


@requires_torchvision
@pytest.mark.parametrize(
    'k,stride,pad,groups,size',
    [(3, 2, 1, 1, (9, 10)), (7, 2, 3, 1, (13, 8)), (3, 2, 1, 4, (6, 7)), (1, 2, 0, 1, (5, 9))],
)
def test_conv_matches_torch(k, stride, pad, groups, size):
  """PyTorch pads symmetrically (flax 'SAME' would not, for stride 2): same numbers as torch.nn.Conv2d."""
  import torch

  torch.manual_seed(0)
  conv = torch.nn.Conv2d(8, 12, k, stride, pad, groups=groups)
  x = np.random.default_rng(0).standard_normal((2, *size, 8)).astype(np.float32)
  ours = layers.Conv(12, (k, k), stride, padding=pad, feature_group_count=groups, as_matmul=True)
  v = {'params': {'kernel': conv_weight(conv.weight), 'bias': conv.bias.detach().numpy()}}
  assert_close(ours.apply(v, x), nhwc(conv(nchw(x))), rtol=1e-5, atol=1e-5)


@requires_torchvision
def test_conv_transpose_matches_torch():
  import torch

  torch.manual_seed(0)
  deconv = torch.nn.ConvTranspose2d(6, 5, 2, stride=2)
  x = np.random.default_rng(1).standard_normal((3, 4, 7, 6)).astype(np.float32)
  kernel = deconv.weight.detach().numpy().transpose(2, 3, 0, 1)
  v = {'params': {'kernel': kernel, 'bias': deconv.bias.detach().numpy()}}
  y = layers.ConvTransposeNonOverlapping(5).apply(v, x)
  assert y.shape == (3, 8, 14, 5)
  assert_close(y, nhwc(deconv(nchw(x))), rtol=1e-5, atol=1e-5)


def test_conv_transpose_gradients_equal_the_float64_reference():
  """y[n, f*i + a, f*j + b, o] = sum_c x[n, i, j, c] k[a, b, c, o]: both gradients from that definition."""
  rng = np.random.default_rng(7)
  x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
  kernel = rng.standard_normal((2, 2, 6, 5)).astype(np.float32)
  deconv = layers.ConvTransposeNonOverlapping(5, use_bias=False)
  g = rng.standard_normal((3, 8, 10, 5)).astype(np.float32)
  grad_fn = jax.grad(lambda x_, k_: jnp.vdot(deconv.apply({'params': {'kernel': k_}}, x_), g), argnums=(0, 1))
  dx, dk = jax.jit(grad_fn)(x, kernel)
  g6 = g.astype(np.float64).reshape(3, 4, 2, 5, 2, 5)  # [n, i, a, j, b, o]
  ref_dk = np.einsum('nijc,niajbo->abco', x.astype(np.float64), g6)
  ref_dx = np.einsum('niajbo,abco->nijc', g6, kernel.astype(np.float64))
  assert_close(dk, ref_dk, rtol=1e-5, atol=1e-5)
  assert_close(dx, ref_dx, rtol=1e-5, atol=1e-5)


def test_conv_transpose_hand_example():
  """One input pixel, one channel: the output 2x2 block at (2i, 2j) is x * kernel, zero elsewhere."""
  x = np.zeros((1, 2, 2, 1), np.float32)
  x[0, 1, 0, 0] = 2.0
  kernel = np.arange(4, dtype=np.float32).reshape(2, 2, 1, 1)
  v = {'params': {'kernel': kernel, 'bias': np.zeros(1, np.float32)}}
  y = np.asarray(layers.ConvTransposeNonOverlapping(1).apply(v, x))[0, :, :, 0]
  expected = np.zeros((4, 4))
  expected[2:4, 0:2] = 2.0 * kernel[:, :, 0, 0]
  np.testing.assert_array_equal(y, expected)


def test_frozen_batch_norm_collection_and_formula():
  x = np.random.default_rng(0).standard_normal((2, 3, 3, 4)).astype(np.float32)
  bn = layers.FrozenBatchNorm()
  v = bn.init(jax.random.key(0), x)
  assert set(v) == {'frozen'}  # never in params, so never in the optimizer
  np.testing.assert_array_equal(v['frozen']['scale'], np.ones(4))
  np.testing.assert_array_equal(v['frozen']['bias'], np.zeros(4))
  scale = np.array([0.5, 2.0, -1.0, 3.0], np.float32)
  bias = np.array([1.0, 0.0, 0.25, -2.0], np.float32)
  y = bn.apply({'frozen': {'scale': scale, 'bias': bias}}, x)
  assert_close(y, x.astype(np.float64) * scale + bias, rtol=1e-6, atol=1e-6)
  assert bn.apply(v, x.astype(jnp.bfloat16)).dtype == jnp.float32
  assert layers.FrozenBatchNorm(dtype=jnp.bfloat16).apply(v, x).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    'channels,groups', [(256, 32), (64, 32), (48, 24), (40, 20), (17, 17), (33, 11), (8, 8)]
)
def test_num_groups_for(channels, groups):
  assert layers.num_groups_for(channels) == groups


def group_norm_reference(x: np.ndarray, groups: int, scale, bias, eps=1e-5) -> np.ndarray:
  """PyTorch GroupNorm on NHWC, float64 loops over (image, group)."""
  x = np.asarray(x, np.float64)
  out = np.empty_like(x)
  c = x.shape[-1]
  per = c // groups
  for n in range(x.shape[0]):
    for g in range(groups):
      chunk = x[n, ..., g * per : (g + 1) * per]
      out[n, ..., g * per : (g + 1) * per] = (chunk - chunk.mean()) / math.sqrt(chunk.var() + eps)
  return out * scale + bias


@pytest.mark.parametrize('channels', [64, 40, 6])
def test_group_norm_matches_reference(channels):
  rng = np.random.default_rng(channels)
  x = (rng.standard_normal((2, 5, 3, channels)) * 3 + 1).astype(np.float32)
  scale = rng.standard_normal(channels).astype(np.float32)
  bias = rng.standard_normal(channels).astype(np.float32)
  gn = layers.GroupNorm()
  shapes = jax.eval_shape(gn.init, jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, shapes) == {'params': {'scale': (channels,), 'bias': (channels,)}}
  y = gn.apply({'params': {'scale': scale, 'bias': bias}}, x)
  expected = group_norm_reference(x, layers.num_groups_for(channels), scale, bias)
  assert_close(y, expected, rtol=1e-4, atol=1e-4)
  y16 = layers.GroupNorm(dtype=jnp.bfloat16).apply({'params': {'scale': scale, 'bias': bias}}, x)
  assert y16.dtype == jnp.bfloat16
  assert_close(y16.astype(jnp.float32), expected, rtol=0.0, atol=0.05 * np.abs(expected).max())


@requires_torchvision
def test_group_norm_matches_torch():
  import torch

  x = np.random.default_rng(0).standard_normal((2, 4, 5, 64)).astype(np.float32)
  ref = torch.nn.GroupNorm(32, 64)
  with torch.no_grad():
    ref.weight.uniform_(0.5, 1.5)
    ref.bias.uniform_(-1, 1)
  v = {'params': {'scale': ref.weight.detach().numpy(), 'bias': ref.bias.detach().numpy()}}
  assert_close(layers.GroupNorm().apply(v, x), nhwc(ref(nchw(x))), rtol=1e-5, atol=1e-5)


def test_make_norm():
  x = jnp.ones((1, 2, 2, 8))
  assert layers.make_norm('none')(name='n')(x) is x
  assert isinstance(layers.make_norm('frozen_bn')(name='n'), layers.FrozenBatchNorm)
  assert isinstance(layers.make_norm('group_norm')(name='n'), layers.GroupNorm)
  with pytest.raises(ValueError, match='unknown norm'):
    layers.make_norm('batch_norm')


def test_init_distributions():
  """kaiming_normal(fan_out) untruncated (torchvision ResNet, mask head), kaiming_uniform(a=1) (FPN),
  and the deconv's fan_out taken as PyTorch does for ConvTranspose2d (Cin * k * k)."""
  big = layers.Conv(128, (3, 3), padding=1).init(jax.random.key(0), jnp.zeros((1, 3, 3, 128)))
  k = np.asarray(big['params']['kernel'])
  expected = math.sqrt(2.0 / (128 * 9))
  assert abs(k.std() - expected) < 0.02 * expected
  assert np.abs(k).max() > 3.5 * k.std()  # untruncated normal, like torch.nn.init.kaiming_normal_
  assert not np.any(big['params']['bias'])
  fpn_conv = layers.Conv(64, (3, 3), padding=1, kernel_init=layers.kaiming_uniform_a1)
  k = np.asarray(fpn_conv.init(jax.random.key(0), jnp.zeros((1, 3, 3, 128)))['params']['kernel'])
  bound = math.sqrt(3.0 / (128 * 9))
  assert 0.99 * bound < np.abs(k).max() <= bound
  deconv = layers.ConvTransposeNonOverlapping(32).init(jax.random.key(0), jnp.zeros((1, 2, 2, 256)))
  expected = math.sqrt(2.0 / (256 * 4))
  assert abs(np.asarray(deconv['params']['kernel']).std() - expected) < 0.05 * expected


# ------------------------------------------------------------------------------------------------ ResNet


def _tv_backbone(depth: str):
  import torch
  import torchvision

  with torch.device('meta'):  # shapes only: skips the (slow) random init of 40-90M parameters
    return getattr(torchvision.models, depth)(weights=None)


@requires_torchvision
@pytest.mark.parametrize(
    'name,depth,kwargs',
    [
        ('resnet18', 18, {}),
        ('resnet34', 34, {}),
        ('resnet50', 50, {}),
        ('resnet101', 101, {}),
        ('resnext101_32x8d', 101, dict(groups=32, width_per_group=8)),
    ],
)
def test_backbone_shapes_match_torchvision(name, depth, kwargs):
  model = resnet_lib.resnet(depth, stride_in_1x1=False, **kwargs)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))
  ours = {k: tuple(v.shape) for k, v in flat(variables).items()}
  theirs = {}
  for key, t in _tv_backbone(name).state_dict().items():
    mapped = tv_backbone_name(key)
    if mapped is not None:
      theirs[mapped] = torch_to_ours_shape(tuple(t.shape))
  assert ours == theirs  # every variable mapped, same shapes, no leftovers on either side


def test_resnet_factories():
  a = resnet_lib.ResNeXt101_32x8d()
  b = resnet_lib.resnet(101, groups=32, width_per_group=8, stride_in_1x1=False)
  fields = ('stage_sizes', 'block_cls', 'groups', 'width_per_group', 'stride_in_1x1')
  assert [getattr(a, f) for f in fields] == [getattr(b, f) for f in fields]
  assert resnet_lib.resnet(34).stage_sizes == (3, 4, 6, 3) and resnet_lib.resnet(34).block_cls is resnet_lib.BasicBlock
  assert resnet_lib.resnet(50).block_cls is resnet_lib.Bottleneck
  with pytest.raises(ValueError):
    resnet_lib.resnet(42)
  with pytest.raises(ValueError):
    resnet_lib.resnet(18, groups=32)


@requires_torchvision
@pytest.mark.parametrize('block,as_matmul', [('bottleneck', True), ('basic', False)])
def test_backbone_matches_torchvision_numerically(block, as_matmul):
  """A 1-block-per-stage torchvision ResNet (eval-mode BN with random stats folded into frozen BN) computes
  what ours computes, on an odd-sized image (stresses stride-2 padding, max-pool borders, strided 1x1)."""
  import torch
  from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

  torch.manual_seed(0)
  if block == 'bottleneck':
    tv = ResNet(Bottleneck, [1, 1, 1, 1], groups=2, width_per_group=32)
    ours = resnet_lib.ResNet(
        stage_sizes=(1, 1, 1, 1),
        block_cls=resnet_lib.Bottleneck,
        groups=2,
        width_per_group=32,
        stride_in_1x1=False,
        freeze_at=0,
        conv1x1_as_matmul=as_matmul,
    )
  else:
    tv = ResNet(BasicBlock, [1, 1, 1, 1])
    ours = resnet_lib.ResNet(
        stage_sizes=(1, 1, 1, 1), block_cls=resnet_lib.BasicBlock, freeze_at=0, conv1x1_as_matmul=as_matmul
    )
  randomize_bn_stats(tv)
  # Negative inputs too: the max-pool's -inf border padding matters only if the stem output could be < 0.
  x = np.random.default_rng(0).standard_normal((1, 45, 51, 3)).astype(np.float32)
  variables = tv_to_variables(tv.state_dict(), tv_backbone_name)
  shapes = jax.tree.map(jnp.shape, jax.eval_shape(ours.init, jax.random.key(0), x))
  assert jax.tree.map(np.shape, variables) == shapes
  out = jax.jit(ours.apply)(variables, x)
  with torch.no_grad():
    t = tv.maxpool(tv.relu(tv.bn1(tv.conv1(nchw(x)))))
    for level, layer in zip(range(2, 6), [tv.layer1, tv.layer2, tv.layer3, tv.layer4]):
      t = layer(t)
      ref = nhwc(t)
      assert out[level].shape == ref.shape
      assert_close(out[level], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_stride_in_1x1_moves_the_stride():
  x = jnp.zeros((1, 64, 64, 3))
  for stride_in_1x1, conv1_hw in [(True, 2), (False, 4)]:
    model = resnet_lib.resnet(50, base_width=8, stride_in_1x1=stride_in_1x1)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)

    def run(v, x, model=model):
      return model.apply(v, x, capture_intermediates=True, mutable=['intermediates'])[1]

    block = jax.eval_shape(run, variables, x)['intermediates']['res5']['block0']  # input 4x4, output 2x2
    assert block['conv1']['__call__'][0].shape[1] == conv1_hw
    assert block['conv2']['__call__'][0].shape[1] == 2
    assert block['downsample_conv']['__call__'][0].shape[1] == 2


def test_resnet_output_shapes_and_channels():
  x = jnp.zeros((2, 96, 64, 3))
  for depth in (18, 50):
    model = resnet_lib.resnet(depth, base_width=8)
    out = jax.eval_shape(lambda x, model=model: model.init_with_output(jax.random.key(0), x)[0], x)
    channels = resnet_lib.stage_channels(depth, 8)
    assert {k: v.shape for k, v in out.items()} == {
        level: (2, 96 // 2**level, 64 // 2**level, channels[level]) for level in range(2, 6)
    }


@pytest.mark.parametrize('freeze_at,norm', [(0, 'frozen_bn'), (1, 'group_norm')])
def test_freeze_at_stops_gradients(freeze_at, norm):
  """freeze_at=0: every stage gets gradients; 1: the stem none, res2 some. (freeze_at=2 on the full model below.)"""
  model = resnet_lib.ResNet((1, 1, 1, 1), resnet_lib.BasicBlock, base_width=4, freeze_at=freeze_at, norm=norm)
  x = np.random.default_rng(0).standard_normal((1, 32, 32, 3)).astype(np.float32)
  variables = random_like(jax.eval_shape(model.init, jax.random.key(0), x))

  def loss(params):
    out = model.apply({**variables, 'params': params}, x)
    return sum(jnp.sum(jnp.square(v)) for v in out.values())

  grads = jax.jit(jax.grad(loss))(variables['params'])

  def max_abs(tree):
    return max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(tree))

  frozen = {'stem'} if freeze_at == 1 else set()
  for name in ('stem', 'res2', 'res3', 'res4', 'res5'):
    assert (max_abs(grads[name]) == 0.0) == (name in frozen), name


# ------------------------------------------------------------------------------------------------ FPN


def _c_features(rng, channels=(8, 16, 32, 64), size=(64, 96), batch=1):
  h, w = size
  return {
      level: rng.standard_normal((batch, h // 2**level, w // 2**level, c)).astype(np.float32)
      for level, c in zip(range(2, 6), channels)
  }


@requires_torchvision
@pytest.mark.parametrize('p6_input,norm', [('p5', 'none'), ('c5', 'none'), ('p5', 'group_norm')])
def test_fpn_matches_torchvision(p6_input, norm):
  import torch
  from torchvision.ops import FeaturePyramidNetwork
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7

  torch.manual_seed(0)
  feats = _c_features(np.random.default_rng(0))
  out_ch = 32
  norm_layer = functools.partial(torch.nn.GroupNorm, 32) if norm == 'group_norm' else None
  # torchvision's P6 reads P5 iff in_channels == out_channels, else C5 (64 channels here).
  extra = LastLevelP6P7(out_ch if p6_input == 'p5' else 64, out_ch)
  tv = FeaturePyramidNetwork([16, 32, 64], out_ch, extra_blocks=extra, norm_layer=norm_layer)
  if norm == 'group_norm':
    with torch.no_grad():
      for m in tv.modules():
        if isinstance(m, torch.nn.GroupNorm):
          m.weight.uniform_(0.5, 1.5)
          m.bias.uniform_(-0.5, 0.5)
  ours = fpn_lib.FPN(channels=out_ch, norm=norm, p6_input=p6_input, conv1x1_as_matmul=True)
  items = {}
  for key, t in tv.state_dict().items():
    m = re.match(r'(inner|layer)_blocks\.(\d)\.(\d)\.(weight|bias)$', key)
    if m:
      kind, i, sub, leaf = m.groups()
      name = ('lateral' if kind == 'inner' else 'output') + str(int(i) + 3) + ('_norm' if sub == '1' else '')
      leaf = {'weight': 'scale' if sub == '1' else 'kernel', 'bias': 'bias'}[leaf]
    else:
      m = re.match(r'extra_blocks\.(p\d)\.(weight|bias)$', key)
      name, leaf = m.group(1), {'weight': 'kernel', 'bias': 'bias'}[m.group(2)]
    items[f'params/{name}/{leaf}'] = conv_weight(t) if t.ndim == 4 else t.detach().numpy()
  variables = unflatten(items)
  shapes = jax.eval_shape(ours.init, jax.random.key(0), feats)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(jnp.shape, shapes)
  out = jax.jit(ours.apply)(variables, feats)
  with torch.no_grad():
    ref = tv({str(level): nchw(feats[level]) for level in (3, 4, 5)})
  assert sorted(out) == [3, 4, 5, 6, 7]
  for level, r in zip(range(3, 8), ref.values()):
    assert_close(out[level], nhwc(r), rtol=1e-4, atol=1e-5)


@requires_torchvision
@pytest.mark.parametrize('src,dst', [((4, 6), (8, 12)), ((3, 5), (7, 9)), ((5, 5), (8, 13))])
def test_upsample_nearest_matches_torch(src, dst):
  import torch

  x = np.random.default_rng(0).standard_normal((1, *src, 2)).astype(np.float32)
  ref = torch.nn.functional.interpolate(nchw(x), size=dst, mode='nearest')
  np.testing.assert_array_equal(fpn_lib.upsample_nearest(jnp.asarray(x), dst), nhwc(ref))


def test_fpn_structure_p2_gn_and_levels():
  feats = _c_features(np.random.default_rng(0), size=(128, 128))
  model = fpn_lib.FPN(channels=16, norm='group_norm', build_p2=True, max_level=6)
  variables = jax.eval_shape(model.init, jax.random.key(0), feats)
  params = variables['params']
  assert set(params) == {
      *(f'{kind}{lv}{suffix}' for kind in ('lateral', 'output') for lv in range(2, 6) for suffix in ('', '_norm')),
      'p6',
  }
  assert set(params['lateral3']) == {'kernel'}  # GN follows: no conv bias (the authors' make_conv)
  assert set(params['p6']) == {'kernel', 'bias'}  # no GN on P6/P7
  out = jax.eval_shape(model.apply, variables, feats)
  assert {k: v.shape for k, v in out.items()} == {lv: (1, 128 // 2**lv, 128 // 2**lv, 16) for lv in range(2, 7)}


def test_fpn_p7_reads_relu_of_p6():
  """Making P6 all negative (bias -1e3) must leave P7 = its bias alone."""
  feats = _c_features(np.random.default_rng(0), size=(128, 128))
  model = fpn_lib.FPN(channels=8)
  params = random_like(jax.eval_shape(model.init, jax.random.key(0), feats))['params']
  params['p6'] = dict(params['p6'], bias=np.full((8,), -1e3, np.float32))
  params['p7'] = dict(params['p7'], bias=np.arange(8.0, dtype=np.float32))
  out = jax.jit(model.apply)({'params': params}, feats)
  assert float(jnp.max(out[6])) < 0
  np.testing.assert_array_equal(out[7], np.broadcast_to(np.arange(8.0), out[7].shape))


# ------------------------------------------------------------------------------------------------ heads


@requires_torchvision
@pytest.mark.parametrize('norm', ['none', 'group_norm'])
def test_retinanet_head_matches_torchvision(norm):
  """Same logits and deltas, same (level, y, x, anchor) order and a*K + c channel layout as torchvision."""
  import torch
  from torchvision.models.detection.retinanet import RetinaNetHead

  torch.manual_seed(0)
  c, a, k = 32, 3, 5
  norm_layer = functools.partial(torch.nn.GroupNorm, 32) if norm == 'group_norm' else None
  tv = RetinaNetHead(c, a, k, norm_layer=norm_layer)
  with torch.no_grad():  # larger weights than the init, so the comparison is not dominated by biases
    for p in tv.parameters():
      p.add_(torch.randn(p.shape) * 0.1)
  ours = heads.RetinaNetHead(num_classes=k, num_anchors=a, width=c, norm=norm)
  rng = np.random.default_rng(0)
  feats = [rng.standard_normal((2, s, s + 1, c)).astype(np.float32) for s in (8, 4, 2)]
  items = {}
  for key, t in tv.state_dict().items():
    m = re.match(r'(classification|regression)_head\.conv\.(\d)\.(\d)\.(weight|bias)$', key)
    prefix = 'cls' if key.startswith('classification') else 'box'
    if m:
      _, i, sub, leaf = m.groups()
      name = f'{prefix}_tower_{i}' if sub == '0' else f'{prefix}_tower_norm_{i}'
      leaf = {'weight': 'kernel' if sub == '0' else 'scale', 'bias': 'bias'}[leaf]
    else:
      name = {'cls_logits': 'cls_logits', 'bbox_reg': 'box_deltas'}[key.split('.')[1]]
      leaf = {'weight': 'kernel', 'bias': 'bias'}[key.split('.')[2]]
    items[f'params/{name}/{leaf}'] = conv_weight(t) if t.ndim == 4 else t.detach().numpy()
  if norm == 'group_norm':  # torchvision v2 drops the tower conv bias before GN; the authors keep it (zero here)
    for i in range(4):
      for prefix in ('cls', 'box'):
        items[f'params/{prefix}_tower_{i}/bias'] = np.zeros(c, np.float32)
  variables = unflatten(items)
  shapes = jax.eval_shape(ours.init, jax.random.key(0), feats)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(jnp.shape, shapes)
  cls_logits, box_deltas = jax.jit(ours.apply)(variables, feats)
  with torch.no_grad():
    ref = tv([nchw(f) for f in feats])
  a_total = sum(s * (s + 1) * a for s in (8, 4, 2))
  assert cls_logits.shape == (2, a_total, k) and box_deltas.shape == (2, a_total, 4)
  assert_close(cls_logits, ref['cls_logits'].numpy(), rtol=1e-4, atol=1e-4)
  assert_close(box_deltas, ref['bbox_regression'].numpy(), rtol=1e-4, atol=1e-4)


def test_retinanet_head_layout_hand_example():
  """Predictor channel a*K + c -> row (y*W + x)*A + a, column c, levels concatenated in order."""
  k, a = 2, 3
  head = heads.RetinaNetHead(num_classes=k, num_anchors=a, width=4, depth=0)
  feats = [np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 1, 1, 4), np.float32)]
  v = random_like(jax.eval_shape(head.init, jax.random.key(0), feats))
  bias = np.arange(a * k, dtype=np.float32)
  v['params']['cls_logits'] = {'kernel': np.zeros((3, 3, 4, a * k), np.float32), 'bias': bias}
  cls_logits, _ = head.apply(v, feats)
  cls_logits = np.asarray(cls_logits)
  assert cls_logits.shape == (1, (6 + 1) * a, k)
  for row in range(7 * a):
    for c in range(k):
      assert cls_logits[0, row, c] == (row % a) * k + c


def test_retinanet_head_prior_and_sharing():
  head = heads.RetinaNetHead(num_classes=7, num_anchors=9, width=16)
  feats = [jax.random.normal(jax.random.key(i), (2, s, s, 16)) for i, s in enumerate((8, 4))]
  (cls_logits, _), v = jax.jit(head.init_with_output)(jax.random.key(0), feats)
  # One set of tower parameters serves every level.
  assert set(v['params']) == {
      *(f'cls_tower_{i}' for i in range(4)),
      *(f'box_tower_{i}' for i in range(4)),
      'cls_logits',
      'box_deltas',
  }
  one_level = jax.eval_shape(head.init, jax.random.key(0), feats[:1])
  assert jax.tree.map(jnp.shape, one_level) == jax.tree.map(jnp.shape, v)
  np.testing.assert_allclose(v['params']['cls_logits']['bias'], -math.log(99.0), rtol=1e-6)
  assert not np.any(v['params']['box_deltas']['bias']) and not np.any(v['params']['cls_tower_0']['bias'])
  assert abs(float(np.std(v['params']['cls_tower_0']['kernel'])) - 0.01) < 0.001  # 2304 samples
  # Params do not depend on the feature sizes (what lets build_model init on a small proxy canvas).
  other = jax.jit(head.init)(jax.random.key(0), [f[:1, :3, :5] for f in feats])
  jax.tree.map(np.testing.assert_array_equal, other, v)
  probs = jax.nn.sigmoid(cls_logits)
  assert abs(float(jnp.mean(probs)) - 0.01) < 1e-3
  assert float(jnp.max(jnp.abs(probs - 0.01))) < 5e-3


@requires_torchvision
def test_mask_head_matches_torchvision():
  """torchvision's Mask R-CNN FPN mask head + predictor (same layers as the authors'), channel k <-> ours k - 1."""
  import torch
  from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

  torch.manual_seed(0)
  c, w, k, depth = 8, 12, 4, 3
  tv_heads = MaskRCNNHeads(c, [w] * depth, 1)
  tv_pred = MaskRCNNPredictor(w, w, k + 1)
  items = {}
  for key, t in tv_heads.state_dict().items():
    i, _, leaf = key.split('.')
    items[f'params/mask_fcn{int(i) + 1}/{"kernel" if leaf == "weight" else "bias"}'] = (
        conv_weight(t) if t.ndim == 4 else t.detach().numpy()
    )
  items['params/conv5_mask/kernel'] = tv_pred.conv5_mask.weight.detach().numpy().transpose(2, 3, 0, 1)
  items['params/conv5_mask/bias'] = tv_pred.conv5_mask.bias.detach().numpy()
  items['params/mask_fcn_logits/kernel'] = conv_weight(tv_pred.mask_fcn_logits.weight)[..., 1:]
  items['params/mask_fcn_logits/bias'] = tv_pred.mask_fcn_logits.bias.detach().numpy()[1:]
  ours = heads.MaskHead(num_classes=k, width=w, depth=depth, conv1x1_as_matmul=True)
  rois = np.random.default_rng(0).standard_normal((2, 3, 7, 7, c)).astype(np.float32)
  variables = unflatten(items)
  shapes = jax.eval_shape(ours.init, jax.random.key(0), rois)
  assert jax.tree.map(np.shape, variables) == jax.tree.map(jnp.shape, shapes)
  logits = jax.jit(ours.apply)(variables, rois)
  assert logits.shape == (2, 3, 14, 14, k) and logits.dtype == jnp.float32
  with torch.no_grad():
    ref = tv_pred(tv_heads(nchw(rois.reshape(6, 7, 7, c))))
  assert_close(logits.reshape(6, 14, 14, k), nhwc(ref)[..., 1:], rtol=1e-4, atol=1e-5)


def test_mask_head_structure_and_dtype():
  head = heads.MaskHead(num_classes=5, width=16, depth=4)
  rois = jnp.ones((1, 2, 14, 14, 8), jnp.bfloat16)
  v = jax.eval_shape(head.init, jax.random.key(0), rois)
  assert set(v) == {'params'}  # no GN, no frozen BN
  assert set(v['params']) == {'mask_fcn1', 'mask_fcn2', 'mask_fcn3', 'mask_fcn4', 'conv5_mask', 'mask_fcn_logits'}
  assert v['params']['mask_fcn_logits']['kernel'].shape == (1, 1, 16, 5)
  out = jax.eval_shape(heads.MaskHead(num_classes=5, width=16, dtype=jnp.bfloat16).apply, v, rois)
  assert out.shape == (1, 2, 28, 28, 5) and out.dtype == jnp.float32


# ------------------------------------------------------------------------------------------------ RetinaMask


@pytest.fixture(scope='module')
def tiny():
  """The tiny model with random variables and its outputs on a 128x128 image (computed once)."""
  config = tiny_config()
  module, _ = rm.build_model(config)
  images = np.random.default_rng(0).standard_normal((1, 128, 128, 3)).astype(np.float32)
  variables = model_vars(random_like(variable_shapes(module, images)))
  return dict(config=config, module=module, images=images, variables=variables)


@requires_torchvision
def test_r50_fpn_retinanet_shapes_match_torchvision():
  import torch
  import torchvision

  with torch.device('meta'):
    tv = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
  config = base.get_config()
  config.model.num_classes = 91
  config.model.mask.enabled = False
  config.model.backbone.stride_in_1x1 = False
  module, _ = rm.build_model(config)
  variables = variable_shapes(module, jnp.zeros((1, 128, 128, 3)))
  ours = {k: tuple(v.shape) for k, v in flat(variables).items()}
  theirs = {}
  for key, t in tv.state_dict().items():
    mapped = tv_retinanet_name(key)
    if mapped is not None:
      theirs[mapped] = torch_to_ours_shape(tuple(t.shape))
  assert len(theirs) == len(ours) > 0
  assert ours == theirs


def test_output_shapes_256x384(tiny):
  module = tiny['module']
  images = jnp.zeros((2, 256, 384, 3))
  out = jax.eval_shape(module.apply, tiny['variables'], images)
  sizes = {3: (32, 48), 4: (16, 24), 5: (8, 12), 6: (4, 6), 7: (2, 3)}
  assert {k: v.shape for k, v in out['features'].items()} == {lv: (2, *hw, 16) for lv, hw in sizes.items()}
  a_total = (32 * 48 + 16 * 24 + 8 * 12 + 4 * 6 + 2 * 3) * 9
  assert a_total == 18414
  assert out['cls_logits'].shape == (2, a_total, 3) and out['cls_logits'].dtype == jnp.float32
  assert out['box_deltas'].shape == (2, a_total, 4) and out['box_deltas'].dtype == jnp.float32


def test_outputs_are_the_head_on_the_pyramid(tiny):
  """__call__ = head applied to P3..P7 of fpn(backbone(images)), levels concatenated lowest first."""
  module, variables, images = tiny['module'], tiny['variables'], tiny['images']
  out = apply_jit(module, variables, images)
  a = module.head_config.num_anchors
  start = 0
  for level in range(3, 8):
    feat = out['features'][level]
    n = feat.shape[1] * feat.shape[2] * a
    single = module.bind(variables).head([feat])
    assert_close(out['cls_logits'][:, start : start + n], single[0], rtol=1e-5, atol=1e-5)
    start += n
  assert start == out['cls_logits'].shape[1]


def test_anchor_count_from_config():
  config = tiny_config(**{'anchors.aspect_ratios': (1.0,), 'anchors.scales_per_octave': 2})
  module, _ = rm.build_model(config)
  assert module.head_config.num_anchors == 2
  images = jnp.zeros((1, 128, 128, 3))
  out = jax.eval_shape(module.apply, model_vars(variable_shapes(module, images)), images)
  assert out['cls_logits'].shape == (1, (256 + 64 + 16 + 4 + 1) * 2, 3)


def test_bfloat16_compute_float32_params_and_outputs(tiny):
  module, _ = rm.build_model(tiny_config(compute_dtype='bfloat16'))
  images = jnp.zeros((1, 128, 128, 3))
  shapes = variable_shapes(module, images)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(shapes))
  assert jax.tree.map(jnp.shape, model_vars(shapes)) == jax.tree.map(jnp.shape, tiny['variables'])
  out = jax.eval_shape(module.apply, model_vars(shapes), images)
  assert out['cls_logits'].dtype == jnp.float32 and out['box_deltas'].dtype == jnp.float32
  assert all(f.dtype == jnp.bfloat16 for f in out['features'].values())
  rois = jnp.zeros((1, 4, 14, 14, 16), jnp.bfloat16)
  masks = jax.eval_shape(functools.partial(mask_logits_jit, module), model_vars(shapes), rois)
  assert masks.shape == (1, 4, 28, 28, 3) and masks.dtype == jnp.float32
  # Same variables, bfloat16 compute: close to float32 (catches a dtype dropped on the floor, or a cast too many).
  a = apply_jit(tiny['module'], tiny['variables'], tiny['images'])
  b = apply_jit(module, tiny['variables'], tiny['images'])
  scale = float(jnp.max(jnp.abs(a['cls_logits'])))
  assert_close(b['cls_logits'], a['cls_logits'], rtol=0.0, atol=0.05 * scale)
  assert float(jnp.max(jnp.abs(b['cls_logits'] - a['cls_logits']))) > 0  # bfloat16 really was used


def test_conv1x1_as_matmul_model_equivalence(tiny):
  module_on, images, variables = tiny['module'], tiny['images'], tiny['variables']
  assert module_on.conv1x1_as_matmul
  module_off, _ = rm.build_model(tiny_config(conv1x1_as_matmul=False))
  rois = np.random.default_rng(1).standard_normal((1, 2, 14, 14, 16)).astype(np.float32)
  # Identical parameter trees: the option changes the computation, never the variables.
  shapes_on, shapes_off = variable_shapes(module_on, images, rois), variable_shapes(module_off, images, rois)
  assert jax.tree.structure(shapes_on) == jax.tree.structure(shapes_off)
  assert jax.tree.map(jnp.shape, shapes_on) == jax.tree.map(jnp.shape, shapes_off)
  out_on = apply_jit(module_on, variables, images)
  out_off = apply_jit(module_off, variables, images)
  # Float32 sums in another order: equal to 1e-5 of the output's scale (random weights give logits ~ 50).
  for a, b in zip(jax.tree.leaves(out_on), jax.tree.leaves(out_off)):
    assert_close(a, b, rtol=0.0, atol=1e-5 * float(jnp.max(jnp.abs(b))))
  full = model_vars(random_like(shapes_on))
  m_on, m_off = mask_logits_jit(module_on, full, rois), mask_logits_jit(module_off, full, rois)
  assert_close(m_on, m_off, rtol=0.0, atol=1e-5 * float(jnp.max(jnp.abs(m_off))))


def test_conv_kernel_grad_model_equivalence(tiny):
  """'taps' and 'xla' kernel gradients: the same variables, and every parameter gradient of the model equal to
  float32 rounding (sums in another order)."""
  images, variables = tiny['images'], tiny['variables']
  assert tiny['module'].conv_kernel_grad == 'auto'  # decided per lowering platform, inside layers.Conv
  module_xla, _ = rm.build_model(tiny_config(conv_kernel_grad='xla'))
  module_taps, _ = rm.build_model(tiny_config(conv_kernel_grad='taps'))

  def grads(module):
    def loss(params):
      out = module.apply({'params': params, 'frozen': variables['frozen']}, images)
      return jnp.sum(out['cls_logits'] ** 2) + jnp.sum(out['box_deltas'] ** 2)

    return flat(jax.jit(jax.grad(loss))(variables['params']))

  g_taps, g_xla = grads(module_taps), grads(module_xla)
  assert g_taps.keys() == g_xla.keys()
  for key in g_xla:
    assert_close(g_taps[key], g_xla[key], rtol=0.0, atol=1e-5 * float(np.max(np.abs(g_xla[key]))) + 1e-12)


def test_frozen_params_mask_matches_zero_gradients(tiny):
  config, module, images = tiny['config'], tiny['module'], tiny['images']
  params, frozen = tiny['variables']['params'], tiny['variables']['frozen']
  assert config.model.backbone.freeze_at == 2
  mask = rm.frozen_params_mask(params, config)
  assert jax.tree.structure(mask) == jax.tree.structure(params)
  marked = {k for k, v in flat(mask).items() if v}
  assert marked == {k for k in flat(params) if re.match(r'backbone/(stem|res2)/', k)}

  def loss(params):
    out = module.apply({'params': params, 'frozen': frozen}, images)
    return jnp.sum(out['cls_logits'] ** 2) + jnp.sum(out['box_deltas'] ** 2)

  grads = flat(jax.jit(jax.grad(loss))(params))
  zero = {k for k, g in grads.items() if not np.any(g)}
  # Exactly the frozen parameters get no gradient (the mask head is not part of __call__).
  assert {k for k in zero if not k.startswith('mask_head/')} == marked
  config = tiny_config()
  config.model.backbone.freeze_at = 0
  assert not any(jax.tree.leaves(rm.frozen_params_mask(params, config)))
  config.model.backbone.freeze_at = 4
  marked4 = {k for k, v in flat(rm.frozen_params_mask(params, config)).items() if v}
  assert {k.split('/')[1] for k in marked4} == {'stem', 'res2', 'res3', 'res4'}
  assert all(k.startswith('backbone/') for k in marked4)


def _flops(module, variables, images, outputs=None) -> float:
  def fn(v, x):
    out = module.apply(v, x)
    return out if outputs is None else {k: out[k] for k in outputs}

  cost = jax.jit(fn).lower(variables, images).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def test_inference_with_mask_costs_what_retinanet_costs(tiny):
  with_mask, images = tiny['module'], tiny['images']
  without, _ = rm.build_model(tiny_config(**{'mask.enabled': False}))
  v_with = model_vars(random_like(variable_shapes(with_mask, images)))
  v_without = model_vars(random_like(variable_shapes(without, images)))
  assert 'mask_head' in v_with['params'] and 'mask_head' not in v_without['params']
  flops = _flops(without, v_without, images)
  assert flops > 0
  assert _flops(with_mask, v_with, images) == flops
  # With P2 built for the mask branch, the detection outputs alone still cost exactly what RetinaNet costs.
  p2, _ = rm.build_model(tiny_config(**{'mask.min_level': 2}))
  v_p2 = model_vars(random_like(variable_shapes(p2, images)))
  assert _flops(p2, v_p2, images, ('cls_logits', 'box_deltas')) == flops


def test_p2_built_when_mask_min_level_is_2(tiny):
  module, _ = rm.build_model(tiny_config(**{'mask.min_level': 2}))
  images = jnp.zeros((1, 128, 128, 3))
  variables = variable_shapes(module, images)
  assert 'lateral2' in variables['params']['fpn'] and 'output2' in variables['params']['fpn']
  out = jax.eval_shape(module.apply, model_vars(variables), images)
  assert sorted(out['features']) == [2, 3, 4, 5, 6, 7]
  assert out['features'][2].shape == (1, 32, 32, 16)
  assert out['cls_logits'].shape[1] == (256 + 64 + 16 + 4 + 1) * 9  # P2 is not a detection level
  assert 'lateral2' not in tiny['variables']['params']['fpn']


@pytest.mark.parametrize(
    'overrides',
    [
        {'fpn.norm': 'group_norm', 'head.norm': 'group_norm'},
        {'backbone.norm': 'group_norm', 'backbone.freeze_at': 0, 'fpn.p6_input': 'c5', 'backbone.depth': 50},
    ],
)
def test_variants_run(overrides):
  module, _ = rm.build_model(tiny_config(**overrides))
  images = np.random.default_rng(0).standard_normal((1, 128, 128, 3)).astype(np.float32)
  shapes = variable_shapes(module, images)
  out = apply_jit(module, model_vars(random_like(shapes)), images)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
  flat_params = flat(shapes['params'])
  if overrides.get('fpn.norm') == 'group_norm':
    assert 'fpn/lateral3_norm/scale' in flat_params and 'head/cls_tower_norm_0/scale' in flat_params
    assert 'fpn/lateral3/bias' not in flat_params and 'head/cls_tower_0/bias' in flat_params
  if overrides.get('backbone.norm') == 'group_norm':
    assert not shapes.get('frozen')
    assert 'backbone/stem/norm/scale' in flat_params and 'backbone/stem/conv/bias' not in flat_params
    assert flat_params['fpn/p6/kernel'].shape == (3, 3, 256, 16)  # P6 on C5 (4 * 8 * 8 channels)


def test_mask_logits_needs_mask_head():
  module, _ = rm.build_model(tiny_config(**{'mask.enabled': False}))
  images = jnp.zeros((1, 128, 128, 3))
  variables = model_vars(variable_shapes(module, images))
  assert 'mask_head' not in variables['params']
  with pytest.raises(ValueError, match='no mask head'):
    jax.eval_shape(functools.partial(mask_logits_jit, module), variables, jnp.zeros((1, 1, 14, 14, 16)))


@pytest.mark.parametrize(
    'key,value,match',
    [
        ('num_classes', 0, 'num_classes'),
        ('compute_dtype', 'float16', 'compute_dtype'),
        ('backbone.depth', 42, 'depth'),
        ('backbone.norm', 'batch_norm', 'backbone.norm'),
        ('backbone.groups', 32, 'groups'),
        ('fpn.p6_input', 'p4', 'p6_input'),
        ('fpn.max_level', 4, 'fpn levels'),
        ('mask.max_level', 8, 'mask levels'),
        ('mask.resolution', 14, 'resolution'),
    ],
)
def test_build_model_rejects_bad_config(key, value, match):
  with pytest.raises(ValueError, match=match):
    rm.build_model(tiny_config(**{key: value}))


def test_module_attributes_hashable():
  module, _ = rm.build_model(tiny_config())
  assert hash(module) == hash(rm.build_model(tiny_config())[0])
  assert module == rm.build_model(tiny_config())[0]


def test_build_model_init_variables():
  """The public init: every collection, the mask head included, the authors' init values, the loss statistics,
  and the same variables as an init on the real canvas."""
  config = tiny_config(**{'fpn.norm': 'group_norm', 'head.norm': 'group_norm'})
  config.loss.beta_max = 0.2
  module, init_fn = rm.build_model(config)
  variables = init_fn(jax.random.key(0), canvas_hw=(256, 384))
  assert set(variables) == {'params', 'frozen', 'loss_stats'}
  assert set(variables['params']) == {'backbone', 'fpn', 'head', 'mask_head'}
  stats = variables['loss_stats']
  np.testing.assert_allclose(stats['box']['mean'], np.full(4, 0.2, np.float32))
  np.testing.assert_array_equal(stats['box']['var'], np.zeros(4, np.float32))
  for key, value in flat(variables['frozen']).items():
    np.testing.assert_array_equal(value, 1.0 if key.endswith('scale') else 0.0)
  for key, value in flat(variables['params']).items():
    if key == 'head/cls_logits/bias':
      np.testing.assert_allclose(value, -math.log(99.0), rtol=1e-6)
    elif key.endswith('bias'):
      assert not np.any(value), key
    elif key.endswith('scale'):
      np.testing.assert_array_equal(value, 1.0)
  # Same structure as an init on the real canvas (values: see test_retinanet_head_prior_and_sharing).
  full = variable_shapes(module, jnp.zeros((1, 256, 384, 3)), jnp.zeros((1, 1, 14, 14, 16)))
  assert jax.tree.map(jnp.shape, model_vars(full)) == jax.tree.map(jnp.shape, model_vars(variables))
  with pytest.raises(ValueError, match='canvas_hw'):
    init_fn(jax.random.key(0), canvas_hw=(0, 384))

"""Tests for retinamask_jax.models.winograd: Winograd F(m x m, 3 x 3) 3x3 convs and their use in layers.Conv.

References: the numpy float64 conv and its gradients from the definition (tests/references.py). In float64 the
algorithm is exact up to rounding, so any wrong transform coefficient, tile offset, crop or gradient term shows
as an error many orders of magnitude above 1e-10.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references
from hypothesis import given, settings
from hypothesis import strategies as st

from retinamask_jax.models import layers, winograd
from retinamask_jax.models import retinamask as rm


@settings(max_examples=6, deadline=None)  # each example compiles new shapes: ~4.4 s each on 2 cores
@given(
    m=st.sampled_from(winograd.TILES),
    n=st.integers(1, 2),
    h=st.integers(1, 11),
    w=st.integers(1, 11),
    cin=st.integers(1, 5),
    cout=st.integers(1, 4),
)
def test_conv3x3_and_its_gradients_equal_the_float64_definition(m, n, h, w, cin, cout):
  """Any image size (smaller than a tile, not a multiple of it), both tile sizes: output, input gradient and
  kernel gradient of the padding-1 3x3 conv, to float64 rounding."""
  rng = np.random.default_rng(h * 1000 + w * 100 + cin * 10 + cout)
  x = rng.standard_normal((n, h, w, cin))
  kernel = rng.standard_normal((3, 3, cin, cout))
  g = rng.standard_normal((n, h, w, cout))
  with jax.enable_x64(True):
    y = winograd.conv3x3(jnp.asarray(x), jnp.asarray(kernel), m)
    dx, dk = jax.grad(lambda x_, k_: jnp.vdot(winograd.conv3x3(x_, k_, m), jnp.asarray(g)), argnums=(0, 1))(
        jnp.asarray(x), jnp.asarray(kernel))
    assert y.dtype == dx.dtype == dk.dtype == jnp.float64
  ref_dx, ref_dk = references.conv_grads(x, kernel, g, 1, 1, 1)
  np.testing.assert_allclose(np.asarray(y), references.conv2d(x, kernel, 1, 1), rtol=0, atol=1e-10)
  np.testing.assert_allclose(np.asarray(dx), ref_dx, rtol=0, atol=1e-10)
  np.testing.assert_allclose(np.asarray(dk), ref_dk, rtol=0, atol=1e-10)


@pytest.mark.parametrize('m,bound', [(2, 3e-6), (4, 5e-5)])
def test_float32_error_is_within_the_documented_bound(m, bound):
  """At the head's width (256 channels, ReLU inputs, He-scaled kernel) the float32 error relative to the largest
  output stays at the documented ~1e-6 (m = 2) / ~1e-5 (m = 4)."""
  rng = np.random.default_rng(m)
  x = np.maximum(rng.standard_normal((1, 12, 20, 256)), 0).astype(np.float32)
  kernel = (rng.standard_normal((3, 3, 256, 64)) * np.sqrt(2 / (9 * 256))).astype(np.float32)
  y = np.asarray(jax.jit(winograd.conv3x3, static_argnums=2)(x, kernel, m), np.float64)
  ref = references.conv2d(x, kernel, 1, 1)
  assert np.max(np.abs(y - ref)) / np.max(np.abs(ref)) < bound


def test_transform_matrices_reproduce_polynomial_multiplication():
  """The defining identity of each F(m, 3): A^T [(G k) * (B^T d)] = the m outputs of correlating the m + 2 inputs d
  with the 3 taps k (1-D), for random d and k in float64."""
  rng = np.random.default_rng(0)
  for m, (bt, g, at) in winograd.TRANSFORMS.items():
    assert bt.shape == (m + 2, m + 2) and g.shape == (m + 2, 3) and at.shape == (m, m + 2)
    for _ in range(5):
      d, k = rng.standard_normal(m + 2), rng.standard_normal(3)
      np.testing.assert_allclose(at @ ((g @ k) * (bt @ d)), [d[i:i + 3] @ k for i in range(m)], atol=1e-12)


@pytest.mark.parametrize('shape,tile', [
    ((1, 64, 64, 256, 256), 4),  # the head's P3 at 512 x 512: 256 tiles of 4 x 4
    ((1, 100, 152, 256, 256), 4),
    ((2, 32, 32, 256, 256), 4),  # 128 tiles of 4 x 4
    ((1, 32, 32, 256, 256), 2),  # 64 tiles of 4 x 4 are too few; 256 of 2 x 2 are enough
    ((2, 16, 16, 256, 256), 2),
    ((1, 16, 16, 256, 256), 0),  # P5 at batch 1: 64 tiles of 2 x 2, direct
    ((100, 14, 14, 256, 256), 4),  # mask head: 14 rounds up to 16 for m = 4 (1.31x the work), still pays
    ((64, 7, 7, 64, 64), 4),  # 7 rounds up to 8 (1.31x)
    ((64, 5, 5, 64, 64), 0),  # 5 rounds up to 8 for m = 4 (2.56x), to 6 for m = 2 (1.44x): direct
    ((4, 48, 48, 32, 32), 0),  # too narrow
    ((4, 48, 48, 64, 64), 4),
])
def test_tile_for_picks_by_rows_waste_and_width(shape, tile):
  assert winograd.tile_for(*shape) == tile


def _conv_pair(features, **kwargs):
  return (layers.Conv(features, (3, 3), padding=1, winograd=True, **kwargs),
          layers.Conv(features, (3, 3), padding=1, winograd=False, **kwargs))


def test_conv_layer_uses_winograd_where_it_pays_with_the_same_variables():
  """layers.Conv(winograd=True) at a size where a tile pays: the same variables as the direct conv, the same outputs
  and gradients up to float32 rounding, and no convolution left in the program."""
  rng = np.random.default_rng(1)
  x = np.maximum(rng.standard_normal((2, 32, 32, 64)), 0).astype(np.float32)
  on, off = _conv_pair(64)
  v_on, v_off = on.init(jax.random.key(0), x), off.init(jax.random.key(0), x)
  jax.tree.map(np.testing.assert_array_equal, v_on, v_off)
  assert 'convolution' not in jax.jit(on.apply).lower(v_on, x).as_text()
  g = rng.standard_normal((2, 32, 32, 64)).astype(np.float32)
  grads = lambda conv: jax.jit(jax.grad(lambda v, x_: jnp.vdot(conv.apply(v, x_), g), argnums=(0, 1)))(v_on, x)
  (gv_on, gx_on), (gv_off, gx_off) = grads(on), grads(off)
  y_on, y_off = on.apply(v_on, x), off.apply(v_on, x)
  scale = np.max(np.abs(np.asarray(y_off)))
  np.testing.assert_allclose(y_on, y_off, rtol=0, atol=3e-5 * scale)
  np.testing.assert_allclose(gx_on, gx_off, rtol=0, atol=3e-5 * np.max(np.abs(np.asarray(gx_off))))
  for a, b in zip(jax.tree.leaves(gv_on), jax.tree.leaves(gv_off)):
    np.testing.assert_allclose(a, b, rtol=0, atol=3e-5 * np.max(np.abs(np.asarray(b))))


@pytest.mark.parametrize('kwargs,shape', [
    (dict(), (1, 8, 8, 64)),  # too small: no tile pays
    (dict(dtype=jnp.bfloat16), (2, 32, 32, 64)),  # bfloat16 keeps the direct conv
    (dict(strides=2), (2, 32, 32, 64)),
    (dict(feature_group_count=2), (2, 32, 32, 64)),
])
def test_conv_layer_keeps_the_direct_conv_elsewhere(kwargs, shape):
  x = np.ones(shape, np.float32)
  on, off = _conv_pair(64, **kwargs)
  v = off.init(jax.random.key(0), x)
  assert 'convolution' in jax.jit(on.apply).lower(v, x).as_text()
  np.testing.assert_array_equal(on.apply(v, x), off.apply(v, x))


def test_model_winograd_option_resolves_and_is_checked():
  assert rm.resolve_winograd('auto', 'float32') == (jax.default_backend() == 'cpu')
  assert rm.resolve_winograd('auto', 'float32', 'cpu') is True
  assert rm.resolve_winograd('auto', 'float32', 'tpu') is False
  assert rm.resolve_winograd('on', 'float32', 'cuda') is True
  assert rm.resolve_winograd('auto', 'bfloat16') is False
  assert rm.resolve_winograd('on', 'bfloat16') is True
  assert rm.resolve_winograd('off', 'float32') is False
  from configs import base

  c = base.get_config()
  c.model.num_classes = 3
  c.model.winograd = 'maybe'
  with pytest.raises(ValueError, match='model.winograd'):
    rm.module_from_config(c)


def test_model_with_winograd_gives_the_detections_of_the_direct_model():
  """model.winograd='on' reaches the 3x3 convs (the FPN and head ones, 64 wide here, 2 x 256 x 256 images:
  F(4, 3) on P3) with the same variables as 'off', and the same head outputs up to float32 rounding."""
  from configs import base

  configs = {}
  for value in ('on', 'off'):
    c = base.get_config()
    c.model.num_classes = 3
    c.model.backbone.depth = 18
    c.model.backbone.base_width = 8
    c.model.fpn.channels = c.model.head.width = 64
    c.model.head.depth = 1
    c.model.mask.enabled = False
    c.model.winograd = value
    configs[value] = c
  images = np.random.default_rng(0).uniform(size=(2, 256, 256, 3)).astype(np.float32)
  (model_on, init), (model_off, _) = rm.build_model(configs['on']), rm.build_model(configs['off'])
  assert model_on.winograd and not model_off.winograd
  variables = init(jax.random.key(0), (256, 256))
  variables = {k: variables[k] for k in ('params', 'frozen')}
  apply_on, apply_off = jax.jit(model_on.apply), jax.jit(model_off.apply)
  assert apply_on.lower(variables, images).as_text().count('convolution') < \
      apply_off.lower(variables, images).as_text().count('convolution')
  out_on, out_off = apply_on(variables, images), apply_off(variables, images)
  for key in ('cls_logits', 'box_deltas'):
    ref = np.asarray(out_off[key])
    np.testing.assert_allclose(out_on[key], ref, rtol=0, atol=1e-4 * np.max(np.abs(ref)))


def test_auto_is_winograd_in_cpu_programs_and_xla_convolution_elsewhere():
  """layers.Conv(winograd='auto'): in a CPU program the very values and gradients of winograd=True; lowered for TPU
  or CUDA, forward and both gradients are XLA convolutions (3 of them, no matmul), while 'on' forces Winograd there."""
  rng = np.random.default_rng(2)
  x = np.maximum(rng.standard_normal((2, 32, 32, 64)), 0).astype(np.float32)
  g = rng.standard_normal((2, 32, 32, 64)).astype(np.float32)
  auto = layers.Conv(64, (3, 3), padding=1, winograd='auto')
  on = layers.Conv(64, (3, 3), padding=1, winograd=True)
  v = auto.init(jax.random.key(0), x)

  def value_and_grads(conv):
    return jax.jit(jax.value_and_grad(lambda v_, x_: jnp.sum(conv.apply(v_, x_) * g), argnums=(0, 1)))

  if jax.default_backend() == 'cpu':
    for a, b in zip(jax.tree.leaves(value_and_grads(auto)(v, x)), jax.tree.leaves(value_and_grads(on)(v, x))):
      np.testing.assert_array_equal(a, b)
  for platform in ('tpu', 'cuda'):
    for conv, convolutions in ((auto, 3), (on, 0)):
      text = value_and_grads(conv).trace(v, x).lower(lowering_platforms=(platform,)).as_text()
      assert text.count('stablehlo.convolution') == convolutions, (platform, conv.winograd)
      assert ('stablehlo.dot_general' in text) == (convolutions == 0)

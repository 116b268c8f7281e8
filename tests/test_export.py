"""export.py: the serialized `jax.export` inference program, reloaded in a fresh process without the model code,
gives the live model's detections and masks; checkpoints and exports load params only.

The model is configs/tiny.py with random weights whose class predictor is scaled up so that well-separated scores
pass the threshold (at init every score is the prior 0.01).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import tiny
from retinamask_jax.export import Detector
from retinamask_jax.models import retinamask as rm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_detector(seed: int = 0) -> Detector:
  c = tiny.get_config()
  c.model.num_classes = 3
  c.model.class_names = ('a', 'b', 'c')
  c.model.category_ids = (7, 8, 9)
  model, init = rm.build_model(c)
  variables = jax.device_get(init(jax.random.key(seed), (128, 128)))
  head = variables['params']['head']['cls_logits']
  rng = np.random.default_rng(seed)
  head['kernel'] = head['kernel'] * 300.0
  head['bias'] = rng.normal(-4.0, 1.0, head['bias'].shape).astype(np.float32)
  return Detector(model, c, {k: variables[k] for k in ('params', 'frozen')})


def images() -> list[np.ndarray]:
  """Three uint8 images already at the test size (128 / 128): landscape, landscape, portrait."""
  rng = np.random.default_rng(5)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((128, 128), (96, 128), (128, 100))]


@pytest.fixture(scope='module')
def detector() -> Detector:
  return tiny_detector()


# A fresh interpreter: first the bare jax.export API (no retinamask_jax at all), then `load_serving`, which must not
# pull in the models, ops, data pipeline or flax.
_SUBPROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    import jax

    path, inputs, outputs = sys.argv[1:4]
    with open(f'{path}/model.jax_export', 'rb') as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    arrays = np.load(f'{path}/variables.npz')
    weights = [arrays[k] for k in sorted(arrays.files)]
    data = np.load(inputs)
    raw = jax.tree.map(np.asarray, exported.call(weights, data['images'], data['image_size']))
    assert not [m for m in sys.modules if m.startswith(('retinamask_jax', 'flax'))]

    from retinamask_jax.export import load_serving

    model = load_serving(path)
    api = model.run(data['images'], data['image_size'])
    per_image = model([data['images'][i, :h, :w] for i, (h, w) in enumerate(data['image_size'])])
    heavy = [m for m in sys.modules if m.startswith(('retinamask_jax.models', 'retinamask_jax.ops',
                                                     'retinamask_jax.data', 'retinamask_jax.train', 'flax'))]
    assert not heavy, heavy
    out = {f'raw_{k}': v for k, v in raw.items()}
    out.update({f'api_{k}': v for k, v in api.items()})
    out.update({f'image{i}_{k}': v for i, r in enumerate(per_image) for k, v in r.items()})
    np.savez(outputs, **out)
    """
)


def test_serving_program_in_a_fresh_process_matches_the_live_model(detector, tmp_path):
  pytest.importorskip('flatbuffers')  # jax.export's serialization format
  path = detector.export_serving(str(tmp_path / 'serving'), batch_size=3)
  with open(os.path.join(path, 'serving.json')) as f:
    meta = json.load(f)
  assert meta['canvas_hw'] == [128, 128] and meta['batch_size'] == 3 and meta['with_masks']
  assert meta['outputs'] == ['boxes', 'classes', 'masks', 'scores', 'valid']
  assert meta['category_ids'] == [7, 8, 9]
  assert meta['resize']['mode'] == 'pil' and 'PIL bilinear' in meta['resize']['rule']
  with pytest.raises(FileExistsError):
    detector.export_serving(path)

  # The live model on the same canvases, prepared as evaluation and Detector.predict prepare them.
  canvases = np.zeros((3, 128, 128, 3), np.uint8)
  floats = np.zeros((3, 128, 128, 3), np.float32)
  sizes = np.zeros((3, 2), np.int32)
  for i, image in enumerate(images()):
    canvas, (h, w), _ = detector._prepare(image)
    floats[i], sizes[i] = canvas, (h, w)
    canvases[i, :h, :w] = image
  live = jax.device_get(detector._predict(detector.variables, floats, sizes))
  assert live['valid'].sum(axis=1).min() >= 10, live['valid'].sum(axis=1)

  inputs, outputs = str(tmp_path / 'inputs.npz'), str(tmp_path / 'outputs.npz')
  np.savez(inputs, images=canvases, image_size=sizes)
  env = dict(os.environ, PYTHONPATH=ROOT)
  done = subprocess.run([sys.executable, '-c', _SUBPROCESS, path, inputs, outputs], cwd=str(tmp_path), env=env,
                        capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]
  got = dict(np.load(outputs))
  for prefix in ('raw_', 'api_'):
    np.testing.assert_array_equal(got[prefix + 'valid'], live['valid'])
    np.testing.assert_array_equal(got[prefix + 'classes'], live['classes'])
    np.testing.assert_allclose(got[prefix + 'boxes'], live['boxes'], atol=1e-4)
    np.testing.assert_allclose(got[prefix + 'scores'], live['scores'], atol=1e-6)
    np.testing.assert_allclose(got[prefix + 'masks'], live['masks'], atol=1e-5)
  print(f'serving vs live: max box diff {np.abs(got["raw_boxes"] - live["boxes"]).max():.2e} px, max score diff '
        f'{np.abs(got["raw_scores"] - live["scores"]).max():.2e}, max mask diff '
        f'{np.abs(got["raw_masks"] - live["masks"]).max():.2e}')

  # Per image, against Detector.predict (original pixels: these images are not resized).
  for i, result in enumerate(detector.predict(images())):
    np.testing.assert_array_equal(got[f'image{i}_classes'], result['classes'])
    np.testing.assert_allclose(got[f'image{i}_boxes'], result['boxes'], atol=1e-4)
    np.testing.assert_allclose(got[f'image{i}_scores'], result['scores'], atol=1e-6)
    assert got[f'image{i}_masks'].shape == (min(len(result['scores']), 50), 28, 28)


def test_serving_export_refuses_bad_arguments(detector, tmp_path):
  with pytest.raises(ValueError, match='multiples of 128'):
    detector.export_serving(str(tmp_path / 'a'), canvas_hw=(100, 128))
  c = tiny.get_config()
  c.model.num_classes = 3
  c.model.mask.enabled = False
  model, init = rm.build_model(c)
  maskless = Detector(model, c, jax.eval_shape(lambda r: init(r, (128, 128)), jax.random.key(0)))
  with pytest.raises(ValueError, match='no mask head'):
    maskless.export_serving(str(tmp_path / 'b'), with_masks=True)


def test_one_serving_artifact_for_cpu_gpu_and_tpu(detector, tmp_path):
  """export_serving(platforms=('cuda', 'tpu')) on this CPU host: one artifact for the host's platform and both
  accelerators; it serves here with the detections of the program it was made from, and its accelerator programs
  hold one XLA convolution per conv layer and none of the CPU algorithms."""
  pytest.importorskip('flatbuffers')
  from test_lowering import assert_portable, conv_applications, op_counts, winograd_matmuls

  from retinamask_jax.export import load_serving, serving_platforms

  host = jax.export.default_export_platform()
  assert serving_platforms() == (host,)
  assert serving_platforms(('gpu', 'tpu', host)) == (host, 'cuda', 'tpu')
  with pytest.raises(ValueError, match='unknown platform'):
    serving_platforms(('metal',))
  path = detector.export_serving(str(tmp_path / 'multi'), platforms=('cuda', 'tpu'))
  model = load_serving(path)
  assert model.platforms == (host, 'cuda', 'tpu')
  with open(os.path.join(path, 'serving.json')) as f:
    assert json.load(f)['platforms'] == [host, 'cuda', 'tpu']

  serve, specs, leaves, *_ = detector._serving_program(None, 1, None)
  canvas = np.zeros((1, 128, 128, 3), np.uint8)
  canvas[0, :96] = images()[1]
  sizes = np.asarray([[96, 128]], np.int32)
  got, want = model.run(canvas, sizes), jax.device_get(serve(leaves, canvas, sizes))
  assert want['valid'].sum() >= 10
  for key in want:
    np.testing.assert_array_equal(got[key], want[key])

  layers = conv_applications(detector.config, with_masks=True)
  for platform in ('cuda', 'tpu'):
    text = serve.trace(*specs).lower(lowering_platforms=(platform,)).as_text()
    assert_portable(text)
    ops = op_counts(text)
    # The deconv of the mask head is its one matmul (layers.ConvTransposeNonOverlapping).
    assert (ops['stablehlo.convolution'], ops['stablehlo.dot_general'], winograd_matmuls(text)) == (layers, 1, 0)


def test_from_checkpoint_reads_params_and_frozen_only(detector, tmp_path, monkeypatch):
  """A train checkpoint (with optimizer state) loads without building an optimizer or a train state."""
  from retinamask_jax.train import loop
  from retinamask_jax.train.checkpoint import Checkpointer

  c = detector.config
  model, init = rm.build_model(c)
  state = loop.create_train_state(c, model, init, jax.random.key(1))
  checkpointer = Checkpointer(str(tmp_path / 'run' / 'checkpoints'), async_save=False)
  checkpointer.save(5, state, {}, c)
  checkpointer.close()

  def no_train_state(*args, **kwargs):
    raise AssertionError('from_checkpoint built a train state')

  monkeypatch.setattr(loop, 'create_train_state', no_train_state)
  loaded = Detector.from_checkpoint(str(tmp_path / 'run'))
  assert set(loaded.variables) == {'params', 'frozen'}
  same = jax.tree.map(np.array_equal, jax.device_get(loaded.variables), jax.device_get(state.variables))
  assert jax.tree.all(same)

  # The params-only export holds exactly params and frozen, and loads back to the same arrays.
  path = loaded.export(str(tmp_path / 'export'))
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckpt:
    assert set(ckpt.metadata(os.path.join(path, 'variables')).item_metadata.keys()) == {'params', 'frozen'}
  again = Detector.from_checkpoint(path)
  assert jax.tree.all(jax.tree.map(np.array_equal, jax.device_get(again.variables), jax.device_get(state.variables)))


def test_serving_metadata_describes_every_resize_mode():
  """serving.json tells a client how to resize for whichever `data.resize` the model was trained with."""
  from retinamask_jax import export
  from retinamask_jax.data import transforms

  assert set(export._RESIZE_RULES) == set(transforms.RESIZE_MODES)
  assert 'torchvision_resized_hw' in export._RESIZE_RULES['torchvision']

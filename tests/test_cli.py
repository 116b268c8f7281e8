"""The command-line contract, through real subprocesses as users and outside checks run it: `train.py`, `eval.py`,
`predict.py` on `configs/tiny.py` (DESIGN.md section 7), and `Detector` on the checkpoint they leave.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from pycocotools.coco import COCO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lines(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def _train_lines(workdir):
  return [r for r in _lines(workdir) if r.get('kind') != 'eval']


def _run(script, *args, check=True):
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, script), *args],
      cwd=ROOT, capture_output=True, text=True, timeout=900,
  )
  if check and proc.returncode != 0:
    raise AssertionError(f'{script} exited {proc.returncode}\nstdout:\n{proc.stdout[-3000:]}\n'
                         f'stderr:\n{proc.stderr[-5000:]}')
  return proc


# Multi-scale over canvases of both orientations: (128, 256) landscape, (256, 128) portrait and (256, 256) for both.
_CLI_OVERRIDES = (
    '--config.data.min_sizes=(96,192)', '--config.data.max_size=256',
    '--config.data.test_min_size=128', '--config.data.test_max_size=256',
    '--config.train.num_steps=12', '--config.train.log_every_steps=1', '--config.checkpoint.every_steps=6',
    '--config.postprocess.score_threshold=0.0', '--config.eval.num_prediction_images=2',
)


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('cli') / 'run')
  proc = _run('train.py', '--config', os.path.join(ROOT, 'configs', 'tiny.py'), '--workdir', workdir,
              *_CLI_OVERRIDES)
  return workdir, proc


def test_train_cli_writes_everything_and_compiles_once_per_canvas(cli_run):
  workdir, proc = cli_run
  assert 'box  AP' in proc.stdout and 'mask AP' in proc.stdout
  lines = _train_lines(workdir)
  assert [r['step'] for r in lines] == list(range(1, 13))
  assert all(isinstance(r['loss'], float) and np.isfinite(r['loss']) for r in lines)
  seen = set()
  for r in lines:
    seen.add(tuple(r['canvas']))
    assert r['train_step_compilations'] == len(seen), (r['step'], seen)
  assert len(seen) >= 2  # the data did exercise several canvases
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['12', '6']
  assert any(f.startswith('events.out.tfevents') for f in os.listdir(os.path.join(workdir, 'tensorboard')))
  assert sorted(f for f in os.listdir(os.path.join(workdir, 'predictions')) if f.endswith('.png'))
  evals = [r for r in _lines(workdir) if r.get('kind') == 'eval']
  assert [r['step'] for r in evals] == [12] and 'bbox/AP' in evals[0] and 'segm/AP' in evals[0]


def test_results_json_is_accepted_by_pycocotools_loadres(cli_run):
  workdir, _ = cli_run
  out = os.path.join(workdir, 'eval', 'step_12')
  gt = COCO(os.path.join(workdir, 'data', 'shapes', 'val', 'instances.json'))
  for kind in ('bbox', 'segm'):
    with open(os.path.join(out, f'{kind}_results.json')) as f:
      results = json.load(f)
    assert results, kind  # score_threshold 0: there are detections to load
    loaded = gt.loadRes(os.path.join(out, f'{kind}_results.json'))
    assert len(loaded.getAnnIds()) == len(results)
    assert set(loaded.getImgIds()) <= set(gt.getImgIds())
    assert {r['category_id'] for r in results} <= set(gt.getCatIds())


def test_eval_cli_reproduces_the_training_run_aps(cli_run):
  workdir, _ = cli_run
  trained = [r for r in _lines(workdir) if r.get('kind') == 'eval'][-1]
  proc = _run('eval.py', '--config', os.path.join(ROOT, 'configs', 'tiny.py'), '--workdir', workdir,
              *_CLI_OVERRIDES)
  with open(os.path.join(workdir, 'eval', 'step_12', 'metrics.json')) as f:
    again = json.load(f)
  for key in ('bbox/AP', 'bbox/AP50', 'segm/AP', 'segm/AP50'):
    assert again[key] == pytest.approx(trained[key], abs=1e-6), key
  assert 'results:' in proc.stdout


def test_predict_cli_draws_images(cli_run, tmp_path):
  workdir, _ = cli_run
  images_dir = os.path.join(workdir, 'data', 'shapes', 'val', 'images')
  files = sorted(os.listdir(images_dir))[:2]
  out = str(tmp_path / 'vis')
  _run('predict.py', '--workdir', workdir, '--out', out, '--score_threshold=0.0', '--images',
       *[os.path.join(images_dir, f) for f in files])
  assert sorted(os.listdir(out)) == sorted([os.path.splitext(f)[0] + '.png' for f in files] + ['detections.json'])


def test_bad_input_exits_with_a_one_line_reason(tmp_path):
  proc = _run('train.py', '--config', os.path.join(ROOT, 'configs', 'tiny.py'), '--workdir', str(tmp_path),
              '--config.data.train_json=/nonexistent/instances.json', '--config.data.train_images=/nonexistent',
              check=False)
  assert proc.returncode != 0
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: data.train_json') and 'Traceback' not in proc.stderr


def test_detector_predict_matches_the_evaluation_results(cli_run):
  """Detector.from_checkpoint + predict on a raw image gives what the evaluation wrote for it (original pixels)."""
  from pycocotools import mask as mask_utils

  from retinamask_jax import Detector
  from retinamask_jax.data import transforms

  workdir, _ = cli_run
  detector = Detector.from_checkpoint(workdir)
  gt = COCO(os.path.join(workdir, 'data', 'shapes', 'val', 'instances.json'))
  with open(os.path.join(workdir, 'eval', 'step_12', 'bbox_results.json')) as f:
    bbox = json.load(f)
  with open(os.path.join(workdir, 'eval', 'step_12', 'segm_results.json')) as f:
    segm = json.load(f)
  image_ids = sorted(gt.getImgIds())[:3]
  files = [os.path.join(workdir, 'data', 'shapes', 'val', 'images', gt.imgs[i]['file_name']) for i in image_ids]
  results = detector.predict([transforms.load_image(f) for f in files])
  for image_id, result in zip(image_ids, results):
    info = gt.imgs[image_id]
    expected = [r for r in bbox if r['image_id'] == image_id]
    assert len(result['scores']) == len(expected) > 0
    assert result['masks'].shape[1:] == (info['height'], info['width'])
    np.testing.assert_allclose(result['scores'], [r['score'] for r in expected], atol=1e-5)
    xywh = np.concatenate([result['boxes'][:, :2], result['boxes'][:, 2:] - result['boxes'][:, :2]], 1)
    np.testing.assert_allclose(xywh, [r['bbox'] for r in expected], atol=0.02)
    assert list(result['category_ids']) == [r['category_id'] for r in expected]
    masks = [mask_utils.decode(r['segmentation']) for r in segm if r['image_id'] == image_id]
    np.testing.assert_array_equal(result['masks'][: len(masks)], np.asarray(masks, bool))


def test_export_round_trip_predicts_the_same(cli_run, tmp_path):
  """A params-only export loads without the training state and predicts exactly what the checkpoint does."""
  from retinamask_jax import Detector

  workdir, _ = cli_run
  detector = Detector.from_checkpoint(workdir)
  path = detector.export(str(tmp_path / 'model'))
  assert sorted(os.listdir(path)) == ['config.json', 'variables']
  with pytest.raises(FileExistsError):
    detector.export(path)
  served = Detector.from_checkpoint(path)
  assert set(served.variables) == {'params', 'frozen'} and served.class_names == detector.class_names
  images = [np.random.default_rng(i).integers(0, 256, (90 + 40 * i, 130, 3), dtype=np.uint8) for i in range(2)]
  for a, b in zip(detector.predict(images), served.predict(images)):
    for key in ('boxes', 'scores', 'classes', 'masks'):
      np.testing.assert_array_equal(a[key], b[key])


def test_multi_host_detection_hand_examples():
  from retinamask_jax.cli import auto_detected_cluster

  assert not auto_detected_cluster({})
  assert not auto_detected_cluster({'SLURM_NTASKS': '1'})
  assert auto_detected_cluster({'SLURM_NTASKS': '4'})
  assert not auto_detected_cluster({'SLURM_NTASKS': '4', 'SLURM_STEP_NUM_TASKS': '1'})  # the step decides
  assert not auto_detected_cluster({'TPU_WORKER_HOSTNAMES': 'localhost'})  # a single-host TPU VM
  assert auto_detected_cluster({'TPU_WORKER_HOSTNAMES': 't1k-0,t1k-1'})


def test_multi_host_flags_must_come_together(tmp_path):
  proc = _run('train.py', '--config', os.path.join(ROOT, 'configs', 'tiny.py'), '--workdir', str(tmp_path),
              '--num_processes=2', check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --coordinator_address, --num_processes')

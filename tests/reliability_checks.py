"""Helpers of tests/test_reliability.py: a COCO dataset with one of every data problem, and `train.py` run as a
subprocess that can be killed at chosen moments, with its memory sampled."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, 'configs', 'tiny.py')

# ------------------------------------------------------------------------------------------- bad data

# As many classes as the shapes data of configs/tiny.py, so that the tests share its compiled program.
CATEGORIES = [{'id': i, 'name': f'class{i}'} for i in range(1, 8)]


def _picture(h: int, w: int, seed: int) -> np.ndarray:
  """A uint8 RGB image with a few bright rectangles on a dark noisy background."""
  rng = np.random.default_rng(seed)
  img = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
  for k in range(3):
    y, x = 10 + 25 * k, 10 + 30 * k
    img[y : y + 20, x : x + 24] = (200, 80 + 40 * k, 50)
  return img


def _box_ann(ann_id: int, image_id: int, bbox: list[float], category_id: int = 1, **extra: Any) -> dict[str, Any]:
  x, y, w, h = bbox
  ann = {
      'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'bbox': bbox, 'iscrowd': 0,
      'area': float(abs(w * h)), 'segmentation': [[x, y, x + w, y, x + w, y + h, x, y + h]],
  }
  ann.update(extra)
  return ann


def write_bad_dataset(root: str) -> dict[str, Any]:
  """Writes `root/images/` and two instances JSONs holding one of every problem of issue 8.

  train.json: every image and every annotation problem; val.json: the image problems only (its annotations are
  clean), so each problem exists once in the run. Returns the paths and, under `expect`, what each problem must be
  reported as: {(kind, key): fragment of the message}, and `ids` of notable images.
  """
  images_dir = os.path.join(root, 'images')
  os.makedirs(images_dir, exist_ok=True)
  images, anns, expect, ids = [], [], {}, {}
  next_ann = [1000]

  def add_image(name: str, h: int, w: int, image_id: int) -> None:
    images.append({'id': image_id, 'file_name': name, 'height': h, 'width': w})

  def ann(image_id: int, bbox: list[float], **kw: Any) -> dict[str, Any]:
    next_ann[0] += 1
    a = _box_ann(next_ann[0], image_id, bbox, **kw)
    anns.append(a)
    return a

  def save(name: str, array: np.ndarray, mode: str | None = None, **kw: Any) -> str:
    path = os.path.join(images_dir, name)
    img = Image.fromarray(array)
    if mode:
      img = img.convert(mode)
    img.save(path, **kw)
    return path

  h, w = 96, 128
  # Plain images, so that there are 12 in all: one epoch is 6 batches of 2 and meets every image. All landscape,
  # so they share one canvas group.
  for i in range(3):
    image_id = 1 + i
    save(f'plain{i}.jpg', _picture(h, w, i), quality=90)
    add_image(f'plain{i}.jpg', h, w, image_id)
    ann(image_id, [10.0, 10.0, 24.0, 20.0])
    ann(image_id, [40.0, 35.0, 24.0, 20.0], category_id=2)

  # The annotation problems, on one readable image.
  image_id = ids['annotated'] = 20
  save('annotated.jpg', _picture(h, w, 20))
  add_image('annotated.jpg', h, w, image_id)
  ann(image_id, [10.0, 10.0, 24.0, 20.0])  # fine
  a = ann(image_id, [30.0, 30.0, 0.0, 0.0])
  expect[('degenerate_box', a['id'])] = f'annotation {a["id"]}'  # zero area
  a = ann(image_id, [60.0, 20.0, -30.0, 20.0])
  expect[('degenerate_box', a['id'])] = f'annotation {a["id"]}'  # negative width
  a = ann(image_id, [5000.0, 4000.0, 30.0, 30.0])
  expect[('degenerate_box', a['id'])] = f'annotation {a["id"]}'  # far outside the image
  a = ann(image_id, [50.0, 40.0, 30.0, 30.0], segmentation=[[50.0, 40.0, 80.0, 70.0]])  # a 2-point polygon
  expect[('bad_polygon', a['id'])] = f'annotation {a["id"]}'
  expect[('no_valid_polygon', a['id'])] = f'annotation {a["id"]}'
  a = ann(image_id, [20.0, 50.0, 20.0, 20.0], category_id=99)
  expect[('unknown_category', a['id'])] = f'annotation {a["id"]}'

  # 300 instances on one image (more than data.max_instances).
  image_id = ids['crowded'] = 21
  name = 'crowded.png'
  path = save(name, _picture(160, 240, 21))
  add_image(name, 160, 240, image_id)
  for r in range(15):
    for c in range(20):
      ann(image_id, [c * 12.0 + 1, r * 10.0 + 1, 9.0, 8.0])
  expect[('gt_truncated', repr(path))] = name

  # Only crowd annotations: the image trains as all-background (data.crowd = 'drop' reports each crowd drop).
  image_id = ids['crowd_only'] = 22
  save('crowd_only.jpg', _picture(h, w, 22))
  add_image('crowd_only.jpg', h, w, image_id)
  for bbox in ([5.0, 5.0, 40.0, 40.0], [60.0, 30.0, 50.0, 50.0]):
    a = ann(image_id, bbox, iscrowd=1)
    expect[('crowd_dropped', a['id'])] = f'annotation {a["id"]}'

  # Image files: grayscale, CMYK and 16-bit files are converted without complaint; a truncated JPEG, a missing
  # file and a file that is not an image are replaced in training and left out of evaluation (reported).
  image_id = ids['gray'] = 30
  save('gray.png', _picture(h, w, 30), mode='L')
  image_id = ids['cmyk'] = 31
  save('cmyk.jpg', _picture(h, w, 31), mode='CMYK')
  sixteen = (_picture(h, w, 32)[..., 0].astype(np.uint16) * 257)
  Image.fromarray(sixteen).save(os.path.join(images_dir, 'sixteen.png'))  # mode I;16
  ids['sixteen'] = 32
  buf = io.BytesIO()
  Image.fromarray(_picture(h, w, 33)).save(buf, format='JPEG', quality=95)
  truncated = os.path.join(images_dir, 'truncated.jpg')
  with open(truncated, 'wb') as f:
    f.write(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
  ids['truncated'] = 33
  with open(os.path.join(images_dir, 'not_an_image.jpg'), 'w') as f:
    f.write('this is a text file, not a JPEG\n')
  ids['not_an_image'] = 34
  ids['missing'] = 35
  for name, image_id in (('gray.png', 30), ('cmyk.jpg', 31), ('sixteen.png', 32), ('truncated.jpg', 33),
                         ('not_an_image.jpg', 34), ('missing.jpg', 35)):
    add_image(name, h, w, image_id)
    ann(image_id, [10.0, 10.0, 24.0, 20.0])
    ann(image_id, [50.0, 40.0, 30.0, 26.0], category_id=2)
  for name in ('truncated.jpg', 'not_an_image.jpg', 'missing.jpg'):
    expect[('unreadable_image', repr(os.path.join(images_dir, name)))] = name

  train_json = os.path.join(root, 'train.json')
  with open(train_json, 'w') as f:
    json.dump({'images': images, 'annotations': anns, 'categories': CATEGORIES}, f)
  val_ids = {1, 2, 30, 31, 32, 33, 34, 35}
  val_json = os.path.join(root, 'val.json')
  with open(val_json, 'w') as f:
    json.dump({'images': [i for i in images if i['id'] in val_ids],
               'annotations': [a for a in anns if a['image_id'] in val_ids], 'categories': CATEGORIES}, f)
  return {'train_json': train_json, 'val_json': val_json, 'images_dir': images_dir, 'expect': expect, 'ids': ids}


# ------------------------------------------------------------------------------------------- train.py


def train_args(workdir: str, *overrides: str) -> list[str]:
  return [sys.executable, os.path.join(ROOT, 'train.py'), '--config', TINY, '--workdir', workdir, *overrides]


def subprocess_env(cache_dir: str) -> dict[str, str]:
  """The environment of the training subprocesses: JAX's persistent compilation cache shared between them, so that
  only the first one compiles (a restarted run reuses the executables; their results are the same bits). The test
  run's cache (tests/conftest.py) where there is one, else `cache_dir`."""
  env = dict(os.environ)
  env.setdefault('JAX_COMPILATION_CACHE_DIR', cache_dir)
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env.pop('XLA_FLAGS', None)
  return env


def train_lines(workdir: str) -> list[dict[str, Any]]:
  """The train lines of metrics.jsonl (skipping a torn last line, which a kill can leave)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if record.get('kind') is None:
        out.append(record)
  return out


def all_lines(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


class RssSampler:
  """Samples VmRSS (MiB) of a process every `period` seconds in a thread, with the last logged step."""

  def __init__(self, pid: int, workdir: str, period: float = 0.5):
    self.pid, self.workdir, self.period = pid, workdir, period
    self.samples: list[tuple[float, int, float]] = []  # (time, last step in metrics.jsonl, RSS MiB)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()

  def _run(self) -> None:
    while not self._stop.is_set():
      rss = read_rss_mib(self.pid)
      if rss is None:
        return
      lines = train_lines(self.workdir)
      self.samples.append((time.monotonic(), lines[-1]['step'] if lines else 0, rss))
      self._stop.wait(self.period)

  def stop(self) -> None:
    self._stop.set()
    self._thread.join()


def read_rss_mib(pid: int) -> float | None:
  try:
    with open(f'/proc/{pid}/status') as f:
      for line in f:
        if line.startswith('VmRSS:'):
          return int(line.split()[1]) / 1024.0
  except (FileNotFoundError, ProcessLookupError):
    return None
  return None


def wait_for_step(proc: subprocess.Popen, workdir: str, step: int, timeout: float) -> int | None:
  """Polls metrics.jsonl until a train line with step >= `step` appears; the step seen, or None if the process
  ended first. Raises TimeoutError after `timeout` seconds."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    lines = train_lines(workdir)
    if lines and lines[-1]['step'] >= step:
      return lines[-1]['step']
    if proc.poll() is not None:
      return None
    time.sleep(0.02)
  raise TimeoutError(f'no step {step} in {workdir}/metrics.jsonl after {timeout} s')


def start(workdir: str, overrides: tuple[str, ...], env: dict[str, str], log_name: str) -> subprocess.Popen:
  os.makedirs(workdir, exist_ok=True)
  log = open(os.path.join(os.path.dirname(workdir), log_name), 'w')  # noqa: SIM115  (the child writes it)
  return subprocess.Popen(train_args(workdir, *overrides), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, timeout: float) -> int:
  try:
    return proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise


def kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
  """Sends `sig` and waits; the exit status (negative: killed by that signal)."""
  if proc.poll() is None:
    os.kill(proc.pid, sig)
  return proc.wait(timeout=120)


def read_log(workdir: str, log_name: str) -> str:
  with open(os.path.join(os.path.dirname(workdir), log_name)) as f:
    return f.read()


def restore_raw(workdir: str, step: int | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """The whole saved train state (params, optimizer state, statistics, step) as numpy arrays by key path, and the
  data state, read with Orbax alone (no model code): what a bitwise comparison of two runs needs."""
  import jax
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'), item_names=('state', 'data'))
  step = manager.latest_step() if step is None else step
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(),
                                                            data=ocp.args.JsonRestore()))
  manager.close()
  flat = jax.tree_util.tree_flatten_with_path(restored['state'])[0]
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}, dict(restored['data'])


def assert_bitwise_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
  assert a.keys() == b.keys()
  different = [k for k in a if a[k].dtype != b[k].dtype or not np.array_equal(a[k], b[k])]
  assert not different, f'{len(different)} of {len(a)} arrays differ, e.g. {different[:3]}'

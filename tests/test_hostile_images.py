"""Hostile or huge image files (issue 22): a decompression bomb is refused from its header, a 12000 x 9000 JPEG is
decoded at a reduced scale, truncated files and non-images are named and refused, the EXIF orientation gives the
upright image, 16-bit / palette / CMYK / RGBA files are converted; `predict.py` predicts the good images, lists the
bad ones and exits 0, or 2 when every image was bad.

References are plain numpy (orientation as array rotations, palette lookups, the CMYK formula, 16-bit scaling) on
files written here, some byte by byte (16-bit RGB and bomb PNGs, which PIL cannot write).
"""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from retinamask_jax.data import transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _png(width: int, height: int, rows, *, bit_depth: int, color_type: int) -> bytes:
  """A PNG file from `rows` (an iterable of each row's raw bytes, filter type 0 is prepended), streamed through
  zlib so that a 40000 x 40000 file never exists uncompressed."""

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)

  z = zlib.compressobj(9)
  idat = b''.join(z.compress(b'\x00' + row) for row in rows) + z.flush()
  ihdr = struct.pack('>IIBBBBB', width, height, bit_depth, color_type, 0, 0, 0)
  return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', idat) + chunk(b'IEND', b'')


def _bomb(path) -> str:
  """A valid 40000 x 40000 PNG (1-bit grayscale, all black) of ~0.2 MB: 1.6 G pixels, 4.8 GB as RGB."""
  row = bytes(40000 // 8)
  data = _png(40000, 40000, (row for _ in range(40000)), bit_depth=1, color_type=0)
  assert len(data) < 5_000_000
  path.write_bytes(data)
  return str(path)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
  """A smooth uint8 RGB picture (gradients, so that JPEG keeps it well)."""
  y, x = np.mgrid[0:h, 0:w].astype(np.float64)
  rng = np.random.default_rng(seed)
  f = rng.uniform(1.0, 3.0, 3)
  planes = [127.5 + 120 * np.sin(f[c] * np.pi * (x / w + (c + 1) * y / h)) for c in range(3)]
  return np.clip(np.rint(np.stack(planes, -1)), 0, 255).astype(np.uint8)


def _exif(orientation: int) -> Image.Exif:
  exif = Image.Exif()
  exif[0x0112] = orientation
  return exif


# numpy references: what a viewer shows for each EXIF orientation, from the stored [h, w, C] array (the EXIF spec's
# row-0 / column-0 table, written independently of PIL's transpose names).
_UPRIGHT_NUMPY = {
  1: lambda a: a,
  2: lambda a: a[:, ::-1],
  3: lambda a: a[::-1, ::-1],
  4: lambda a: a[::-1],
  5: lambda a: np.swapaxes(a, 0, 1),
  6: lambda a: np.rot90(a, k=-1),
  7: lambda a: np.rot90(a, k=-1)[::-1],
  8: lambda a: np.rot90(a, k=1),
}


# ------------------------------------------------------------------------------------------------- bombs


def test_bomb_is_refused_by_name_before_anything_is_decoded(tmp_path, monkeypatch):
  bomb = _bomb(tmp_path / 'bomb.png')
  decoded = []
  real_load = ImageFile.ImageFile.load
  monkeypatch.setattr(ImageFile.ImageFile, 'load', lambda self: decoded.append(self) or real_load(self))
  previous = Image.MAX_IMAGE_PIXELS
  for source in (bomb, open(bomb, 'rb').read()):
    with pytest.raises(T.DataError, match=r'bomb\.png: 40000 x 40000 = 1600 M pixels, over the limit of 268 M'
                                          if isinstance(source, str) else r'^<bytes>: 40000 x 40000'):
      T.load_image(source)
  assert not decoded  # refused from the header: no pixel was decoded
  assert Image.MAX_IMAGE_PIXELS == previous  # PIL's own switch is restored

  # The limit is the module constant: one pixel over it is refused, at it is decoded.
  path = tmp_path / 'small.png'
  Image.fromarray(_photo(10, 10)).save(path)
  monkeypatch.setattr(T, 'MAX_IMAGE_PIXELS', 99)
  with pytest.raises(T.DataError, match=r'small\.png: 10 x 10 = 0 M pixels, over the limit'):
    T.load_image(str(path))
  monkeypatch.setattr(T, 'MAX_IMAGE_PIXELS', 100)
  assert T.load_image(str(path)).shape == (10, 10, 3)


def test_bomb_refusal_allocates_nothing_like_its_size(tmp_path):
  """In a fresh process (so the peak is this refusal's): the peak resident memory stays a small fraction of the
  4.8 GB the bomb would take as RGB (1.6 GB even as PIL's 1-bit image, one byte per pixel)."""
  bomb = _bomb(tmp_path / 'bomb.png')
  # VmHWM, the peak of this process's own memory (ru_maxrss would include the parent's peak: Linux keeps it across
  # exec).
  code = textwrap.dedent(f"""
      from retinamask_jax.data import transforms as T
      try:
        T.load_image({bomb!r})
      except T.DataError as e:
        print('refused:', e)
      print(next(line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM:')))
  """)
  proc = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        check=True)
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith('refused: ') and 'bomb.png' in lines[0]
  peak_mb = int(lines[-1]) / 1024  # kB
  assert peak_mb < 400, peak_mb  # the interpreter with numpy, PIL, pycocotools: ~100 MB


# ----------------------------------------------------------------------------------------- huge photos


@pytest.fixture(scope='module')
def huge_jpeg(tmp_path_factory):
  """A 12000 x 9000 (w x h) JPEG stored sideways with EXIF orientation 6, as phones write portrait photos; and the
  picture it stores, at 1/4 scale (3000 x 2250), as the reference."""
  small = _photo(450, 600, seed=3)
  big = Image.fromarray(small).resize((12000, 9000), Image.BILINEAR)
  path = tmp_path_factory.mktemp('huge') / 'huge.jpg'
  big.save(path, 'JPEG', quality=90, exif=_exif(6))
  del big
  quarter = np.asarray(Image.fromarray(small).resize((3000, 2250), Image.BILINEAR))
  return str(path), quarter


def test_draft_scale_keeps_twice_the_needed_side():
  assert T.draft_scale(12000, 9000, None) == 1
  assert T.draft_scale(12000, 9000, 1333) == 4  # 3000 >= 2 x 1333; 1500 would not be
  assert T.draft_scale(12000, 9000, 128) == 8
  assert T.draft_scale(5332, 4000, 1333) == 2 and T.draft_scale(5331, 4000, 1333) == 1
  assert T.draft_scale(1333, 800, 1333) == 1  # an ordinary image is decoded exactly


def test_huge_jpeg_is_decoded_downscaled_and_upright(huge_jpeg):
  path, quarter = huge_jpeg
  decoded = T.decode_image(path, max_side=1333)
  # Drafted at 1/4 (12000 / 4 = 3000 >= 2 x 1333), then turned upright: 2250 wide, 3000 high.
  assert decoded.image.shape == (3000, 2250, 3) and decoded.image.dtype == np.uint8
  assert decoded.full_hw == (12000, 9000)
  expected = _UPRIGHT_NUMPY[6](quarter).astype(int)
  diff = np.abs(decoded.image.astype(int) - expected)
  assert diff.mean() < 2.0, diff.mean()  # JPEG at quality 90 and libjpeg's DCT scaling vs a bilinear resize


def test_ordinary_images_decode_exactly_with_a_hint(tmp_path):
  for h, w, max_side in ((480, 640, 1333), (2000, 3000, 800), (600, 800, 128)):
    path = tmp_path / f'{h}x{w}.jpg'
    Image.fromarray(_photo(h, w)).save(path, 'JPEG', quality=90)
    exact = T.load_image(str(path))
    hinted = T.decode_image(str(path), max_side=max_side)
    if T.draft_scale(w, h, max_side) == 1:
      np.testing.assert_array_equal(hinted.image, exact)
    else:  # 800 x 600 for a 128 side: 1/2 scale, still >= 2 x 128
      assert hinted.image.shape == (h // 2, w // 2, 3) and hinted.full_hw == (h, w)
  # A phone's multi-picture JPEG (MPO) is reduced like a JPEG (its first picture).
  mpo = io.BytesIO()
  Image.fromarray(_photo(600, 800)).save(mpo, 'MPO', save_all=True, append_images=[Image.fromarray(_photo(60, 80))])
  assert Image.open(mpo).format == 'MPO'
  hinted = T.decode_image(mpo.getvalue(), max_side=128)
  assert hinted.image.shape == (300, 400, 3) and hinted.full_hw == (600, 800)
  # PNGs have no reduced decode: always exact.
  path = tmp_path / 'big.png'
  Image.fromarray(_photo(600, 800)).save(path)
  np.testing.assert_array_equal(T.load_image(str(path), max_side=64), np.asarray(Image.open(path)))


# ------------------------------------------------------------------------------------- damaged files


def test_truncated_files_and_non_images_are_named_and_refused(tmp_path):
  jpeg = io.BytesIO()
  Image.fromarray(_photo(64, 96)).save(jpeg, 'JPEG', quality=90)
  png = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 96, 3), np.uint8)).save(png, 'PNG')
  cases = {
    'cut.jpg': (jpeg.getvalue()[: len(jpeg.getvalue()) // 2], r'truncated image file'),
    'cut.png': (png.getvalue()[: len(png.getvalue()) // 2], r'truncated image file'),
    'header_only.png': (png.getvalue()[:60], r'truncated image file|cannot decode image'),
    'notes.jpg': (b'this is a text file, not a JPEG\n', r'not an image'),
    'empty.png': (b'', r'not an image'),
  }
  for name, (data, reason) in cases.items():
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(T.DataError, match=rf'^{str(path)}: ({reason})'):
      T.load_image(str(path))
  with pytest.raises(T.DataError, match=r'nope\.jpg: image file not found'):
    T.load_image(str(tmp_path / 'nope.jpg'))


# ----------------------------------------------------------------------------------------- orientation


@pytest.mark.parametrize('orientation', range(1, 9))
def test_exif_orientation_gives_the_upright_image(tmp_path, orientation):
  stored = np.random.default_rng(orientation).integers(0, 256, (5, 8, 3), np.uint8)  # not square, not symmetric
  path = tmp_path / 'photo.png'
  Image.fromarray(stored).save(path, 'PNG', exif=_exif(orientation))
  upright = _UPRIGHT_NUMPY[orientation](stored)
  decoded = T.decode_image(str(path))
  np.testing.assert_array_equal(decoded.image, upright)
  assert decoded.full_hw == upright.shape[:2]
  # Annotations in the upright grid (the JSON gives the upright size): the same upright image.
  np.testing.assert_array_equal(T.load_image(str(path), grid_hw=upright.shape[:2]), upright)


def test_annotations_in_the_stored_grid_keep_it_and_say_so(tmp_path, caplog):
  stored = np.random.default_rng(0).integers(0, 256, (5, 8, 3), np.uint8)
  path = tmp_path / 'sideways.png'
  Image.fromarray(stored).save(path, 'PNG', exif=_exif(6))
  before = T.REPORT_COUNTS['exif_orientation_ignored']
  for _ in range(2):
    np.testing.assert_array_equal(T.load_image(str(path), grid_hw=(5, 8)), stored)
  assert T.REPORT_COUNTS['exif_orientation_ignored'] == before + 1  # reported once per file
  # A half-turn cannot be told from the size: upright, like every tag the JSON's size agrees with.
  Image.fromarray(stored).save(path, 'PNG', exif=_exif(3))
  np.testing.assert_array_equal(T.load_image(str(path), grid_hw=(5, 8)), stored[::-1, ::-1])


def test_training_records_follow_their_json_grid_and_refuse_bombs(tmp_path):
  from retinamask_jax.data import coco, pipeline

  def record(path, h, w):
    empty = np.zeros((0, 4), np.float32)
    return coco.ImageRecord(0, str(path), h, w, empty, np.zeros((0,), np.int32), [], np.zeros((0,), np.int64))

  stored = np.random.default_rng(1).integers(0, 256, (5, 8, 3), np.uint8)
  path = tmp_path / 'phone.png'
  Image.fromarray(stored).save(path, 'PNG', exif=_exif(8))
  np.testing.assert_array_equal(pipeline.load_record_image(record(path, 8, 5)), np.rot90(stored, k=1))
  np.testing.assert_array_equal(pipeline.load_record_image(record(path, 5, 8)), stored)
  # A bomb is a DataError like any unreadable file: training replaces the image, evaluation leaves it out
  # (tests/test_reliability.py), each reported once.
  with pytest.raises(T.DataError, match=r'bomb\.png: 40000 x 40000'):
    pipeline.load_record_image(record(_bomb(tmp_path / 'bomb.png'), 40000, 40000))


# --------------------------------------------------------------------------------------------- modes


def test_16_bit_palette_cmyk_and_alpha_are_converted(tmp_path):
  rng = np.random.default_rng(7)
  h, w = 6, 9
  cases = {}
  # 16-bit grayscale, any values: round(v / 257) (the full 16-bit range onto 8 bits).
  gray16 = rng.integers(0, 65536, (h, w), dtype=np.uint16)
  cases['gray16.png'] = (_png(w, h, (r.astype('>u2').tobytes() for r in gray16), bit_depth=16, color_type=0),
                         np.repeat(np.rint(gray16 / 257.0).astype(np.uint8)[..., None], 3, -1), 0)
  # 16-bit RGB: PIL keeps the high byte (v >> 8), within 1 of round(v / 257).
  rgb16 = rng.integers(0, 65536, (h, w, 3), dtype=np.uint16)
  cases['rgb16.png'] = (_png(w, h, (r.astype('>u2').tobytes() for r in rgb16), bit_depth=16, color_type=2),
                        np.rint(rgb16 / 257.0).astype(np.uint8), 1)
  # Palette, with and without a transparent entry: the palette's colours.
  index = rng.integers(0, 16, (h, w), dtype=np.uint8)
  palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
  p = Image.fromarray(index, 'P')
  p.putpalette(palette.ravel().tolist())
  cases['palette.png'] = (p, palette[index], 0)
  pt = p.copy()
  pt.info['transparency'] = 3
  cases['palette_alpha.png'] = (pt, palette[index], 0)
  # CMYK (lossless TIFF): R = (255 - C) (255 - K) / 255, likewise G from M and B from Y.
  cmyk = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
  k = 255 - cmyk[..., 3:].astype(np.float64)
  cases['cmyk.tif'] = (Image.fromarray(cmyk, 'CMYK'),
                       np.rint((255 - cmyk[..., :3].astype(np.float64)) * k / 255).astype(np.uint8), 1)
  # RGBA and LA: the colour channels as stored (alpha dropped, not composited).
  rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
  cases['rgba.png'] = (Image.fromarray(rgba, 'RGBA'), rgba[..., :3], 0)
  la = rng.integers(0, 256, (h, w, 2), dtype=np.uint8)
  cases['la.png'] = (Image.fromarray(la, 'LA'), np.repeat(la[..., :1], 3, -1), 0)
  for name, (content, expected, tolerance) in cases.items():
    path = tmp_path / name
    if isinstance(content, bytes):
      path.write_bytes(content)
    else:
      content.save(path)
    out = T.load_image(str(path))
    assert out.dtype == np.uint8 and out.shape == (h, w, 3), name
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= tolerance, name


# ----------------------------------------------------------------------------------------------- predict.py


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """configs/tiny.py with random weights, exported (params + config.json): what predict.py loads, no training.
  As tests/test_export.py makes it (the same init program, compiled once per test run): the class predictor is
  scaled up so that some scores pass the pre-NMS threshold (at init every score is the prior 0.01)."""
  import jax

  from configs import tiny
  from retinamask_jax.export import Detector
  from retinamask_jax.models import retinamask as rm

  c = tiny.get_config()
  c.model.num_classes = 3
  c.model.class_names = ('a', 'b', 'c')
  c.model.category_ids = (7, 8, 9)
  model, init = rm.build_model(c)
  variables = jax.device_get(init(jax.random.key(0), (128, 128)))
  head = variables['params']['head']['cls_logits']
  head['kernel'] = head['kernel'] * 300.0
  head['bias'] = np.random.default_rng(0).normal(-4.0, 1.0, head['bias'].shape).astype(np.float32)
  path = str(tmp_path_factory.mktemp('export') / 'model')
  detector = Detector(model, c, {k: variables[k] for k in ('params', 'frozen')})
  detector.export(path)
  return path, int(c.data.test_max_size), detector


def _predict(model: str, out: str, *images: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, 'predict.py'), '--workdir', model, '--out', out, '--score_threshold=0.0',
     '--images', *images],
    cwd=ROOT, capture_output=True, text=True, timeout=300,
  )


def test_predict_cli_predicts_the_good_images_and_lists_the_bad_ones(exported, huge_jpeg, tmp_path):
  model, test_max_size, _ = exported
  upright = _photo(90, 60, seed=1)
  Image.fromarray(upright).save(tmp_path / 'upright.png')
  # The same picture stored sideways with orientation 6, as a phone writes a portrait photo.
  Image.fromarray(np.rot90(upright, k=1)).save(tmp_path / 'phone.png', exif=_exif(6))
  bomb = _bomb(tmp_path / 'bomb.png')
  (tmp_path / 'notes.jpg').write_text('not an image\n')
  huge, _ = huge_jpeg
  images = [str(tmp_path / 'upright.png'), bomb, str(tmp_path / 'phone.png'), huge, str(tmp_path / 'notes.jpg')]
  out = str(tmp_path / 'vis')
  proc = _predict(model, out, *images)
  assert proc.returncode == 0, proc.stderr[-3000:]
  skipped = [line for line in proc.stderr.splitlines() if line.startswith('skipped ')]
  assert len(skipped) == 2
  assert skipped[0].startswith(f'skipped {bomb}: 40000 x 40000 = 1600 M pixels, over the limit')
  assert skipped[1] == f'skipped {tmp_path / "notes.jpg"}: not an image (no format PIL reads)'
  assert 'wrote 3 images and detections.json' in proc.stdout and '(2 skipped)' in proc.stdout
  assert sorted(os.listdir(out)) == ['detections.json', 'huge.png', 'phone.png', 'upright.png']

  with open(os.path.join(out, 'detections.json')) as f:
    entries = json.load(f)
  by_file = {}
  for e in entries:
    by_file.setdefault(e['file_name'], []).append(e)
  assert [e['file_name'] for e in entries if 'error' in e] == [bomb, str(tmp_path / 'notes.jpg')]
  assert by_file[bomb][0]['error'].startswith('40000 x 40000 = 1600 M pixels')
  # The sideways phone photo gives exactly the upright picture's detections, in upright pixels (60 wide, 90 high).
  assert by_file[images[0]] and [{k: v for k, v in e.items() if k != 'file_name'} for e in by_file[images[0]]] == \
      [{k: v for k, v in e.items() if k != 'file_name'} for e in by_file[images[2]]]
  w, h = Image.open(os.path.join(out, 'phone.png')).size  # the drawing enlarges small images k times
  assert (w, h) == (w // 60 * 60, w // 60 * 90)
  # The 12000 x 9000 JPEG (upright: 9000 wide, 12000 high) is predicted and drawn at twice the test size (k times
  # for legibility); its boxes are in the file's pixels.
  w, h = Image.open(os.path.join(out, 'huge.png')).size
  side = 2 * test_max_size
  assert (w, h) == (h // side * side * 3 // 4, h // side * side)
  boxes = np.array([e['bbox'] for e in by_file[huge]])
  assert len(boxes) and boxes[:, 0].min() >= 0 and boxes[:, 1].min() >= 0
  assert (boxes[:, 0] + boxes[:, 2]).max() <= 9000 + 0.01 and (boxes[:, 1] + boxes[:, 3]).max() <= 12000 + 0.01
  assert (boxes[:, 1] + boxes[:, 3]).max() > 4 * test_max_size  # scaled back beyond the drawn image's size


def test_predict_cli_exits_2_when_every_image_is_bad(exported, tmp_path):
  model, _, detector = exported
  bomb = _bomb(tmp_path / 'bomb.png')
  missing = str(tmp_path / 'missing.jpg')
  out = str(tmp_path / 'vis')
  proc = _predict(model, out, bomb, missing)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert [line for line in lines if line.startswith('skipped ')] == [
    f'skipped {bomb}: 40000 x 40000 = 1600 M pixels, over the limit of 268 M '
    '(retinamask_jax.data.transforms.MAX_IMAGE_PIXELS); refused without decoding it (a decompression bomb?)',
    f'skipped {missing}: image file not found',
  ]
  assert lines[-1] == 'error: none of the 2 images could be used (each is named above)'
  with open(os.path.join(out, 'detections.json')) as f:
    assert [e['file_name'] for e in json.load(f)] == [bomb, missing]
  # The library call itself raises, naming the file (nothing is compiled or run for it).
  with pytest.raises(T.DataError, match=r'bomb\.png: 40000 x 40000'):
    detector.predict([bomb])

"""Tests for retinamask_jax.data.transforms: hand-worked cases and plain float64 references."""

import io
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from retinamask_jax.data import transforms as T

# pycocotools' decode trips a numpy 2 deprecation on every call.
pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

# ------------------------------------------------------------------------------------- references


def ref_resized_hw(h, w, min_size, max_size):
  """The authors' get_size (spec 1.3), written out from the text with Python floats."""
  size = min_size
  mn, mx = float(min(h, w)), float(max(h, w))
  if mx / mn * size > max_size:
    size = int(round(max_size * mn / mx))
  if (w <= h and w == size) or (h <= w and h == size):
    return h, w
  if w < h:
    ow = size
    oh = int(size * h / w)
  else:
    oh = size
    ow = int(size * w / h)
  return oh, ow


def ref_crop(full_mask, box, m):
  """Area-resampled crop by explicit loops: cell value 1 iff mask coverage of the cell >= 1/2."""
  x1, y1, x2, y2 = (float(v) for v in box)
  cw, ch = (x2 - x1) / m, (y2 - y1) / m
  h, w = full_mask.shape
  out = np.zeros((m, m), np.uint8)
  for i in range(m):
    cy0, cy1 = y1 + i * ch, y1 + (i + 1) * ch
    for j in range(m):
      cx0, cx1 = x1 + j * cw, x1 + (j + 1) * cw
      covered = 0.0
      for py in range(max(int(np.floor(cy0)), 0), min(int(np.ceil(cy1)), h)):
        oy = min(cy1, py + 1) - max(cy0, py)
        for px in range(max(int(np.floor(cx0)), 0), min(int(np.ceil(cx1)), w)):
          if full_mask[py, px]:
            covered += oy * (min(cx1, px + 1) - max(cx0, px))
      out[i, j] = covered / (cw * ch) >= 0.5 - 1e-6
  return out


def decode_full(seg, h, w):
  if isinstance(seg, list):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(seg, h, w)))
  if isinstance(seg.get('counts'), list):
    return mask_utils.decode(mask_utils.frPyObjects(seg, h, w))
  return mask_utils.decode(dict(seg, counts=seg['counts'].encode()))


def _png16_rgb(arr):
  """A 16-bit RGB PNG written by hand (PIL cannot write one)."""
  h, w, _ = arr.shape
  raw = b''.join(b'\x00' + arr[y].astype('>u2').tobytes() for y in range(h))

  def chunk(t, d):
    return struct.pack('>I', len(d)) + t + d + struct.pack('>I', zlib.crc32(t + d) & 0xFFFFFFFF)

  ihdr = struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0)
  return (b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(raw))
          + chunk(b'IEND', b''))


# ------------------------------------------------------------------------------------- resize rule


@pytest.mark.parametrize(
    'hw, sizes, expected',
    [
        ((480, 640), (800, 1333), (800, 1066)),  # 800 * 640 / 480 = 1066.67 -> int
        ((640, 480), (800, 1333), (1066, 800)),  # portrait
        ((427, 640), (800, 1333), (800, 1199)),
        ((100, 1000), (800, 1333), (133, 1330)),  # capped: round(133.3) = 133, int(1330.0)
        ((800, 1000), (800, 1333), (800, 1000)),  # already the size: unchanged
        ((1, 2), (4, 5), (2, 4)),  # round(2.5) = 2 (half to even), not 3
        ((300, 300), (256, 512), (256, 256)),
    ],
)
def test_resized_hw_hand_worked(hw, sizes, expected):
  assert T.resized_hw(*hw, *sizes) == expected


@given(
    st.integers(1, 3000), st.integers(1, 3000), st.integers(8, 1200), st.integers(8, 2000)
)
def test_resized_hw_matches_reference(h, w, min_size, max_size):
  assert T.resized_hw(h, w, min_size, max_size) == ref_resized_hw(h, w, min_size, max_size)


# ------------------------------------------------------------------------------------- decoding


def _save(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def test_load_image_modes(tmp_path):
  rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
  gray = rgb[..., 0]
  gray3 = np.repeat(gray[..., None], 3, -1)
  alpha = np.full((5, 7), 7, np.uint8)
  cases = {
      'rgb.png': (_save(Image.fromarray(rgb), 'PNG'), rgb),
      'gray.png': (_save(Image.fromarray(gray), 'PNG'), gray3),
      'rgba.png': (_save(Image.fromarray(np.dstack([rgb, alpha])), 'PNG'), rgb),
      'la.png': (_save(Image.fromarray(np.dstack([gray, alpha]), 'LA'), 'PNG'), gray3),
      'palette.png': (_save(Image.fromarray(rgb).quantize(256), 'PNG'), None),
      'gray16.png': (_save(Image.fromarray(gray.astype(np.uint16) * 257), 'PNG'), gray3),
      'rgb16.png': (_png16_rgb(rgb.astype(np.uint16) * 257), rgb),
      'cmyk.jpg': (_save(Image.fromarray(rgb).convert('CMYK'), 'JPEG', quality=100), None),
  }
  for name, (data, expected) in cases.items():
    path = tmp_path / name
    path.write_bytes(data)
    for source in (str(path), data):
      out = T.load_image(source)
      assert out.dtype == np.uint8 and out.shape == (5, 7, 3), name
      if expected is not None:
        np.testing.assert_array_equal(out, expected, err_msg=name)
  # Palette quantization and CMYK round trips are lossy: close to the source colours.
  pal = T.load_image(str(tmp_path / 'palette.png')).astype(int)
  assert np.abs(pal - rgb).mean() < 12
  cmyk = T.load_image(str(tmp_path / 'cmyk.jpg')).astype(int)
  assert np.abs(cmyk - rgb).mean() < 20


def test_load_image_exif_orientation_follows_the_annotation_grid(tmp_path):
  rgb = np.zeros((4, 6, 3), np.uint8)
  rgb[0, 0] = 255
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90 CW" for viewers
  path = tmp_path / 'exif.jpg'
  Image.fromarray(rgb).save(path, 'JPEG', exif=exif, quality=100)
  assert T.load_image(str(path)).shape == (6, 4, 3)  # upright, as viewers show it
  assert T.load_image(str(path), grid_hw=(6, 4)).shape == (6, 4, 3)  # annotations in the upright grid
  assert T.load_image(str(path), grid_hw=(4, 6)).shape == (4, 6, 3)  # annotations in the stored grid


def test_load_image_errors(tmp_path):
  missing = str(tmp_path / 'nope.jpg')
  with pytest.raises(T.DataError, match='nope.jpg'):
    T.load_image(missing)
  text = tmp_path / 'notes.jpg'
  text.write_text('not an image')
  with pytest.raises(T.DataError, match='notes.jpg'):
    T.load_image(str(text))
  # A truncated JPEG is refused (its missing part would be grey, under annotations), naming the file.
  rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
  data = _save(Image.fromarray(rgb), 'JPEG', quality=90)
  cut = tmp_path / 'cut.jpg'
  cut.write_bytes(data[: len(data) * 2 // 3])
  with pytest.raises(T.DataError, match=r'cut\.jpg: truncated image file'):
    T.load_image(str(cut))


# ------------------------------------------------------------------------------------- geometry


def test_normalize_hand_worked():
  img = np.array([[[10, 20, 30]]], np.uint8)
  bgr = T.normalize(img, channel_order='bgr', pixel_range=255.0, mean=(1, 2, 3), std=(2, 2, 2))
  np.testing.assert_allclose(bgr[0, 0], [(30 - 1) / 2, (20 - 2) / 2, (10 - 3) / 2])
  rgb = T.normalize(img, channel_order='rgb', pixel_range=1.0, mean=(0.485, 0.456, 0.406),
                    std=(0.229, 0.224, 0.225))
  expected = (np.array([10, 20, 30]) / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
  np.testing.assert_allclose(rgb[0, 0], expected, rtol=1e-6)
  assert bgr.dtype == np.float32
  with pytest.raises(ValueError):
    T.normalize(img, channel_order='hsv')


def test_pad_and_resize():
  img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
  out = T.pad_to_canvas(img, (4, 5))
  assert out.shape == (4, 5, 3)
  np.testing.assert_array_equal(out[:2, :3], img)
  assert not out[2:].any() and not out[:, 3:].any()
  with pytest.raises(ValueError):
    T.pad_to_canvas(img, (1, 5))
  big = np.random.default_rng(0).integers(0, 256, (10, 20, 3), dtype=np.uint8)
  np.testing.assert_array_equal(T.resize_image(big, (5, 10)),
                                np.asarray(Image.fromarray(big).resize((10, 5), Image.BILINEAR)))
  assert T.resize_image(big, (10, 20)) is big


def test_flip_and_scale_boxes():
  boxes = np.array([[1.0, 2.0, 4.5, 6.0], [0.0, 0.0, 10.0, 3.0]], np.float32)
  flipped = T.hflip_boxes(boxes, 10)
  np.testing.assert_array_equal(flipped, [[5.5, 2.0, 9.0, 6.0], [0.0, 0.0, 10.0, 3.0]])
  np.testing.assert_array_equal(T.hflip_boxes(flipped, 10), boxes)
  scaled = T.scale_boxes(boxes, (20, 10), (40, 15))
  np.testing.assert_allclose(scaled, [[1.5, 4.0, 6.75, 12.0], [0.0, 0.0, 15.0, 6.0]])
  clipped = T.clip_boxes(np.array([[-1, -2, 12, 30]], np.float32), 20, 10)
  np.testing.assert_array_equal(clipped, [[0, 0, 10, 20]])


def test_image_flip_matches_box_flip():
  # A bright rectangle at a box; the flipped image has it at the flipped box.
  img = np.zeros((6, 10, 3), np.uint8)
  img[1:4, 2:5] = 255
  flipped = T.hflip_image(img)
  ys, xs = np.nonzero(flipped[..., 0])
  box = T.hflip_boxes(np.array([[2, 1, 5, 4]], np.float32), 10)[0]
  assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == tuple(box)


# ------------------------------------------------------------------------------------- masks


def test_masks_to_crops_hand_worked():
  h, w = 4, 4
  one_pixel = np.zeros((h, w), np.uint8)
  one_pixel[0, 0] = 1
  rle = mask_utils.encode(np.asfortranarray(one_pixel))
  rle = {'size': [h, w], 'counts': rle['counts'].decode()}
  out = T.masks_to_crops([rle], np.array([[0, 0, 2, 2]], np.float32), h, w, 2)
  np.testing.assert_array_equal(out[0], [[1, 0], [0, 0]])
  out = T.masks_to_crops([rle], np.array([[0, 0, 2, 2]], np.float32), h, w, 4)
  np.testing.assert_array_equal(out[0], [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]])
  # Half-covered cells count (coverage >= 1/2): box [0.5, 2.5] x [0, 1], mask = pixel column 1 only.
  col = np.zeros((h, w), np.uint8)
  col[0, 1] = 1
  rle = mask_utils.encode(np.asfortranarray(col))
  out = T.masks_to_crops([rle], np.array([[0.5, 0, 2.5, 1]], np.float32), h, w, 2)
  np.testing.assert_array_equal(out[0], [[1, 1], [1, 1]])
  # Polygons at integer coordinates cover whole pixels (pixel i spans [i, i + 1)).
  left_half = [[0.0, 0.0, 2.0, 0.0, 2.0, 4.0, 0.0, 4.0]]
  out = T.masks_to_crops([left_half], np.array([[0, 0, 4, 4]], np.float32), 4, 4, 2)
  np.testing.assert_array_equal(out[0], [[1, 0], [1, 0]])
  centre = [[1.0, 1.0, 3.0, 1.0, 3.0, 3.0, 1.0, 3.0]]
  two = np.array([[0, 0, 4, 4], [1, 1, 3, 3]], np.float32)
  out = T.masks_to_crops([centre, centre], two, 4, 4, 4)
  np.testing.assert_array_equal(out[0], [[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
  assert out[1].all()  # the crop is box-relative: the box of the square is all mask
  # Each 2x2 quadrant holds a quarter of the square: below one half, so empty.
  out = T.masks_to_crops([centre], np.array([[0, 0, 4, 4]], np.float32), 4, 4, 2)
  assert not out.any()
  # No segmentation: the filled box.
  out = T.masks_to_crops([None, [[1, 2, 3, 4]]], np.array([[0, 0, 3, 3], [0, 0, 3, 3]], np.float32),
                         4, 4, 3)
  assert out.all()


def _random_instance(rng, h, w):
  """A random polygon (2-decimal coordinates, like COCO) and its box from the decoded mask."""
  cx, cy = rng.uniform(0, w), rng.uniform(0, h)
  r = rng.uniform(1.5, min(h, w) / 2)
  n = rng.integers(3, 9)
  ang = np.sort(rng.uniform(0, 2 * np.pi, n))
  rad = r * rng.uniform(0.4, 1.0, n)
  poly = np.round(np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1), 2)
  return [poly.ravel().tolist()]


def test_masks_to_crops_matches_reference_for_polygons_and_rles():
  rng = np.random.default_rng(0)
  h, w, m = 23, 31, 7
  segs, boxes, fulls = [], [], []
  while len(segs) < 24:
    poly = _random_instance(rng, h, w)
    full = decode_full(poly, h, w)
    if full.sum() < 2:
      continue
    kind = len(segs) % 3
    if kind == 0:
      seg = poly
    elif kind == 1:
      enc = mask_utils.encode(np.asfortranarray(full))
      seg = {'size': [h, w], 'counts': enc['counts'].decode()}
    else:  # uncompressed RLE (column-major runs, zeros first), as COCO crowd annotations
      flat = full.T.ravel()
      runs, cur, n = [], 0, 0
      for v in flat:
        if v != cur:
          runs.append(n)
          cur, n = v, 0
        n += 1
      runs.append(n)
      seg = {'size': [h, w], 'counts': runs}
    ys, xs = np.nonzero(full)
    # Boxes from the mask, jittered by sub-pixel amounts, some sticking out of the image.
    box = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)
    box += rng.uniform(-0.7, 0.7, 4)
    box = np.clip(box, [-2, -2, box[0] + 0.5, box[1] + 0.5], [w + 2, h + 2, w + 2, h + 2])
    segs.append(seg)
    boxes.append(box)
    fulls.append(full)
  out = T.masks_to_crops(segs, np.array(boxes, np.float32), h, w, m)
  assert out.shape == (24, m, m) and out.dtype == np.uint8
  for k in range(24):
    expected = ref_crop(fulls[k], np.float32(boxes[k]), m)
    np.testing.assert_array_equal(out[k], expected, err_msg=str(k))


def test_masks_to_crops_flip_mirrors_crop():
  rng = np.random.default_rng(3)
  h, w, m = 20, 26, 8
  for _ in range(10):
    full = decode_full(_random_instance(rng, h, w), h, w)
    if full.sum() < 4:
      continue
    ys, xs = np.nonzero(full)
    box = np.array([[xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]], np.float32)
    rle = mask_utils.encode(np.asfortranarray(full))
    rle_f = mask_utils.encode(np.asfortranarray(full[:, ::-1]))
    a = T.masks_to_crops([rle], box, h, w, m)
    b = T.masks_to_crops([rle_f], T.hflip_boxes(box, w), h, w, m)
    np.testing.assert_array_equal(T.hflip_crops(a), b)


def test_window_rasterization_matches_full_image(monkeypatch):
  """Large images rasterize polygons only in a window: it must agree with the full-image decode."""
  rng = np.random.default_rng(5)
  h, w, m = 40, 50, 16
  polys, boxes, rects, rect_boxes = [], [], [], []
  while len(polys) < 30:
    p = _random_instance(rng, h, w)
    full = decode_full(p, h, w)
    if full.sum() < 4:
      continue
    ys, xs = np.nonzero(full)
    polys.append(p)
    boxes.append([xs.min() + 0.3, ys.min() + 0.2, xs.max() + 0.6, ys.max() + 0.9])
    # Axis-aligned rectangles (some partly outside the image) have no rounding ties at all.
    x0, y0 = rng.integers(-3, w - 2), rng.integers(-3, h - 2)
    x1, y1 = x0 + rng.integers(2, 20), y0 + rng.integers(2, 20)
    rects.append([[x0, y0, x1, y0, x1, y1, x0, y1]])
    rect_boxes.append([max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)])
  polys_full = T.masks_to_crops(polys, np.array(boxes, np.float32), h, w, m)
  rects_full = T.masks_to_crops(rects, np.array(rect_boxes, np.float32), h, w, m)
  monkeypatch.setattr(T, '_FULL_DECODE_MAX_PIXELS', 0)
  polys_win = T.masks_to_crops(polys, np.array(boxes, np.float32), h, w, m)
  rects_win = T.masks_to_crops(rects, np.array(rect_boxes, np.float32), h, w, m)
  np.testing.assert_array_equal(rects_win, rects_full)
  assert rects_full.any()
  # pycocotools rounds edge points after adding the (shifted) start coordinate, so exact half-way
  # points can round differently after a translation: a few boundary cells may differ.
  assert np.mean(polys_win != polys_full) < 0.01
  for a, b in zip(polys_win, polys_full):
    inter, union = np.logical_and(a, b).sum(), np.logical_or(a, b).sum()
    assert union == 0 or inter / union > 0.8


def test_masks_to_crops_bad_rle_is_filled_box_and_reported():
  before = T.REPORT_COUNTS['bad_mask']
  bad = {'size': [4, 4], 'counts': '!!!garbage'}
  out = T.masks_to_crops([bad], np.array([[0, 0, 2, 2]], np.float32), 4, 4, 2, name='x.jpg')
  assert out.all()
  assert T.REPORT_COUNTS['bad_mask'] == before + 1


# ------------------------------------------------------------------------------------- GT padding


@given(st.lists(st.floats(0, 100, allow_nan=False), min_size=0, max_size=12), st.integers(1, 8),
       st.lists(st.booleans(), min_size=12, max_size=12))
def test_select_instances(areas, g, prio):
  areas = np.array(areas, np.float64)
  priority = np.array(prio[: len(areas)], bool)
  keep = T.select_instances(areas, g, priority=priority)
  n = len(areas)
  if n <= g:
    np.testing.assert_array_equal(keep, np.arange(n))
    return
  assert len(keep) == g and np.all(np.diff(keep) > 0)
  # Reference: rank rows by (priority desc, area desc, index asc) with a plain sort of tuples.
  ranked = sorted(range(n), key=lambda i: (not priority[i], -areas[i], i))
  np.testing.assert_array_equal(keep, sorted(ranked[:g]))


def test_pad_rows():
  x = np.ones((2, 3), np.int32)
  out = T.pad_rows(x, 4, fill=-5)
  np.testing.assert_array_equal(out, [[1, 1, 1], [1, 1, 1], [-5, -5, -5], [-5, -5, -5]])
  with pytest.raises(ValueError):
    T.pad_rows(x, 1)

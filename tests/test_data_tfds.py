"""Tests for retinamask_jax.data.tfds: a TFDS array_record split read as the same `CocoDataset` as its JSON.

The TFDS datasets are written here without TensorFlow (a `GeneratorBasedBuilder` with file_format='array_record'; the
encoded images and the mask PNGs are passed as bytes, so TFDS never needs TF to encode them) from the synthetic shapes
split, and every record is compared with what `coco.load_coco` reads from that split's JSON.
"""

import concurrent.futures
import io
import json
import multiprocessing
import os
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

tfds = pytest.importorskip('tensorflow_datasets')
pytest.importorskip('array_record')

from configs import tiny  # noqa: E402
from retinamask_jax.data import coco as coco_lib  # noqa: E402
from retinamask_jax.data import pipeline, shapes  # noqa: E402
from retinamask_jax.data import tfds as tfds_lib  # noqa: E402
from retinamask_jax.train import loop  # noqa: E402

pytestmark = pytest.mark.filterwarnings('ignore:__array__ implementation:DeprecationWarning')

# TFDS stores normalized float32 boxes: the pixel boxes come back within float32 rounding of a ~128 px image.
BOX_TOL = 1e-3


def _segmentation_mask(seg, height, width):
  """uint8 [height, width] of a COCO segmentation as `ImageRecord`s hold them (float64 polygons or RLE dict)."""
  if isinstance(seg, dict):
    counts = seg['counts']
    if isinstance(counts, list):
      rle = mask_utils.frPyObjects(seg, height, width)
    else:
      rle = {'size': seg['size'], 'counts': counts.encode('ascii') if isinstance(counts, str) else counts}
    return mask_utils.decode(rle)
  polys = [np.asarray(p, np.float64).tolist() for p in seg]
  return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polys, height, width)))


def _png(mask):
  buf = io.BytesIO()
  # 0/255 on purpose: the loader must treat any nonzero value as foreground.
  Image.fromarray(mask.astype(np.uint8) * 255).save(buf, 'PNG')
  return buf.getvalue()


def _write_tfds(json_path, images_dir, data_dir, *, masks=False, minimal=False):
  """Writes the JSON split as a TFDS dataset (split 'train', array_record); returns its version directory.

  Features as TFDS `coco/2017`: image, image/id, image/filename and objects {bbox (normalized ymin, xmin, ymax,
  xmax), label (ClassLabel, names in category-id order), is_crowd, id, area}; masks=True adds objects/mask
  (uint8 [H, W, 1] PNG, as in TFDS's LVIS); minimal=True keeps only image and objects {bbox, label}.
  """
  with open(json_path) as f:
    data = json.load(f)
  cats = sorted(data['categories'], key=lambda c: c['id'])
  label_of = {c['id']: k for k, c in enumerate(cats)}
  objects = {'bbox': tfds.features.BBoxFeature(), 'label': tfds.features.ClassLabel(names=[c['name'] for c in cats])}
  features = {'image': tfds.features.Image()}
  if not minimal:
    objects.update(id=np.int64, area=np.int64, is_crowd=np.bool_)
    features.update({'image/id': np.int64, 'image/filename': tfds.features.Text()})
  if masks:
    objects['mask'] = tfds.features.Image(shape=(None, None, 1), encoding_format='png')
  features['objects'] = tfds.features.Sequence(objects)
  anns = {}
  for ann in data['annotations']:
    anns.setdefault(ann['image_id'], []).append(ann)

  def examples():
    for img in data['images']:
      h, w = img['height'], img['width']
      objs = []
      for ann in anns.get(img['id'], []):
        x, y, bw, bh = ann['bbox']
        obj = {
            'bbox': tfds.features.BBox(ymin=y / h, xmin=x / w, ymax=(y + bh) / h, xmax=(x + bw) / w),
            'label': label_of[ann['category_id']],
        }
        if not minimal:
          obj.update(id=ann['id'], area=int(ann['area']), is_crowd=bool(ann['iscrowd']))
        if masks:
          obj['mask'] = _png(_segmentation_mask(ann['segmentation'], h, w))
        objs.append(obj)
      with open(os.path.join(images_dir, img['file_name']), 'rb') as f:
        ex = {'image': f.read(), 'objects': objs}
      if not minimal:
        ex.update({'image/id': img['id'], 'image/filename': img['file_name']})
      yield img['id'], ex

  class ShapesTfds(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {'train': self._generate_examples()}

    def _generate_examples(self):
      return examples()

  builder = ShapesTfds(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return str(builder.data_dir)


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """The shapes split (12 images: crowd, polygon and RLE masks, an image without objects) and its TFDS copies."""
  root = tmp_path_factory.mktemp('tfds')
  json_path, images_dir = shapes.write_shapes_dataset(str(root), 'train', 12, image_size=(96, 128), seed=0)
  return {
      'json_path': json_path,
      'images_dir': images_dir,
      'boxes': _write_tfds(json_path, images_dir, str(root / 'boxes')),
      'masks': _write_tfds(json_path, images_dir, str(root / 'masks'), masks=True),
      'minimal': _write_tfds(json_path, images_dir, str(root / 'minimal'), minimal=True),
      'data_dir': str(root / 'boxes'),
  }


def _by_id(ds):
  return {r.image_id: r for r in ds.records}


def _assert_masks_equal(segs_a, segs_b, height, width):
  assert len(segs_a) == len(segs_b)
  for a, b in zip(segs_a, segs_b):
    np.testing.assert_array_equal(_segmentation_mask(a, height, width), _segmentation_mask(b, height, width))


@pytest.mark.parametrize('variant', ['boxes', 'masks'])
@pytest.mark.parametrize('crowd', ['drop', 'ignore'])
def test_records_match_load_coco(data, variant, crowd):
  ref = coco_lib.load_coco(data['json_path'], data['images_dir'], crowd=crowd)
  ds = tfds_lib.load_tfds(builder_dir=data[variant], split='train', crowd=crowd, category_ids=ref.category_ids)
  assert ds.category_ids == ref.category_ids
  assert ds.class_names == ref.class_names
  assert ds.report == ref.report  # the same problems found (crowd_dropped with crowd='drop'), nothing else
  assert len(ds.records) == len(ref.records) == 12
  got, want = _by_id(ds), _by_id(ref)
  assert got.keys() == want.keys()
  assert any(len(r.boxes) == 0 for r in ref.records)  # the data covers an image without objects...
  assert sum(len(r.crowd_boxes) for r in ref.records) == (crowd == 'ignore')  # ...a crowd region...
  assert {type(s) for r in ref.records for s in r.segmentations} == {list, dict}  # ...polygons and RLEs
  for image_id, w in want.items():
    g = got[image_id]
    assert (g.height, g.width) == (w.height, w.width)
    assert g.file_name == os.path.basename(w.file_name)
    assert g.image_ref is not None and g.image_bytes is None
    np.testing.assert_allclose(g.boxes, w.boxes, rtol=0, atol=BOX_TOL)
    np.testing.assert_array_equal(g.classes, w.classes)
    np.testing.assert_array_equal(g.ann_ids, w.ann_ids)
    np.testing.assert_allclose(g.crowd_boxes, w.crowd_boxes, rtol=0, atol=BOX_TOL)
    np.testing.assert_array_equal(g.crowd_ann_ids, w.crowd_ann_ids)
    if variant == 'masks':
      _assert_masks_equal(g.segmentations, w.segmentations, w.height, w.width)
      _assert_masks_equal(g.crowd_segmentations, w.crowd_segmentations, w.height, w.width)
    else:  # no masks: the mask targets are the filled boxes
      assert all(s is None for s in g.segmentations + g.crowd_segmentations)
  # Evaluation ground truth: every annotation (crowd ones too), with COCO's area (COCOeval's area ranges use it).
  assert sorted(ds.coco.getImgIds()) == sorted(ref.coco.getImgIds())
  assert sorted(ds.coco.anns) == sorted(ref.coco.anns)
  for ann_id, w in ref.coco.anns.items():
    g = ds.coco.anns[ann_id]
    assert (g['image_id'], g['category_id'], g['iscrowd']) == (w['image_id'], w['category_id'], w['iscrowd'])
    np.testing.assert_allclose(g['bbox'], w['bbox'], rtol=0, atol=BOX_TOL)
    assert g['area'] == w['area']


def test_default_category_ids_map_label_k_to_class_k_plus_1(data):
  ref = coco_lib.load_coco(data['json_path'], data['images_dir'])
  ds = tfds_lib.load_tfds(builder_dir=data['boxes'], split='train')
  # The shapes category ids are not contiguous (1, 2, 5, 7, ...): by default TFDS label k is category k + 1.
  assert ref.category_ids != ds.category_ids == tuple(range(1, 8))
  assert ds.class_names == ref.class_names
  got = _by_id(ds)
  for w in ref.records:
    names = [ds.class_names[c - 1] for c in got[w.image_id].classes]
    assert names == [ref.class_names[c - 1] for c in w.classes]
  with open(data['json_path']) as f:
    cat_name = {c['id']: c['name'] for c in json.load(f)['categories']}
  for ann_id, w in ref.coco.anns.items():
    assert ds.class_names[ds.coco.anns[ann_id]['category_id'] - 1] == cat_name[w['category_id']]


def test_minimal_features_defaults(data):
  """Without image/id, image/filename, objects/id, is_crowd, area: the documented defaults."""
  with open(data['json_path']) as f:
    raw = json.load(f)
  ds = tfds_lib.load_tfds(builder_dir=data['minimal'], split='train', crowd='ignore')
  assert [r.image_id for r in ds.records] == list(range(1, 13))  # example index + 1
  assert [r.file_name for r in ds.records] == [f'train[{i}]' for i in range(12)]
  # Which JSON image each example holds (TFDS shuffled them), found by its encoded bytes.
  image_of = {}
  for img in raw['images']:
    with open(os.path.join(data['images_dir'], img['file_name']), 'rb') as f:
      image_of[f.read()] = img
  source = tfds_lib._source(data['minimal'], 'train')
  num_anns = 0
  for i, g in enumerate(ds.records):
    img = image_of[source[i]['image']]
    assert (g.height, g.width) == (img['height'], img['width'])
    # Nothing is crowd: the JSON's crowd regions are ordinary objects here, in the JSON's order.
    xywh = np.array([a['bbox'] for a in raw['annotations'] if a['image_id'] == img['id']]).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
    np.testing.assert_allclose(g.boxes, xyxy, rtol=0, atol=BOX_TOL)
    assert len(g.crowd_boxes) == 0
    # Annotation ids count up from 1 in example order; the area is the box's.
    np.testing.assert_array_equal(g.ann_ids, np.arange(num_anns + 1, num_anns + 1 + len(g.boxes)))
    num_anns += len(g.boxes)
    for ann_id, box in zip(g.ann_ids, g.boxes):
      assert ds.coco.anns[int(ann_id)]['area'] == pytest.approx((box[2] - box[0]) * (box[3] - box[1]), rel=1e-4)
  assert num_anns == len(raw['annotations'])


def test_duplicate_image_ids_keep_the_first_example(data, monkeypatch):
  real = tfds_lib._source(data['boxes'], 'train')
  a, b, c = (real[i] for i in range(3))
  assert len(a['objects']['bbox']) != len(b['objects']['bbox'])
  fake = [a, dict(b, **{'image/id': a['image/id']}), c]  # decoded examples as the data source returns them
  monkeypatch.setattr(tfds_lib, '_source', lambda builder_dir, split: fake)
  ds = tfds_lib.load_tfds(builder_dir=data['boxes'], split='train')
  assert ds.report['duplicate_image_id'] == 1
  assert [r.image_id for r in ds.records] == [a['image/id'], c['image/id']]
  first = ds.records[0]
  assert first.image_ref.read() == a['image']
  # Only the first example's objects: the duplicate's would otherwise join them through the shared image id.
  assert set(first.ann_ids.tolist()) <= {int(i) for i in a['objects']['id']}
  assert sorted(ds.coco.getAnnIds(imgIds=[a['image/id']])) == sorted(int(i) for i in a['objects']['id'])


def test_name_and_split_slices(data):
  ds = tfds_lib.load_tfds('shapes_tfds', data_dir=data['data_dir'], split='train[3:8]', in_memory=True)
  full = tfds_lib.load_tfds(builder_dir=data['boxes'], split='train')
  assert [r.image_id for r in ds.records] == [r.image_id for r in full.records[3:8]]
  for r in ds.records:  # in memory: the encoded files themselves
    assert r.image_ref is None
    with open(os.path.join(data['images_dir'], r.file_name), 'rb') as f:
      assert r.image_bytes == f.read()
  with pytest.raises(ValueError, match='name or a builder_dir'):
    tfds_lib.load_tfds(split='train')
  with pytest.raises(ValueError, match='3 category_ids for 7 labels'):
    tfds_lib.load_tfds(builder_dir=data['boxes'], split='train', category_ids=(1, 2, 3))


def test_records_pickle_and_read_in_another_process(data):
  ds = tfds_lib.load_tfds(builder_dir=data['boxes'], split='train')
  ref = _by_id(coco_lib.load_coco(data['json_path'], data['images_dir']))
  blobs = [pickle.dumps(r) for r in ds.records]  # what grain sends to its workers
  records = [pickle.loads(b) for b in blobs]
  for r in records:
    with open(ref[r.image_id].file_name, 'rb') as f:
      assert r.image_ref.read() == f.read()
    np.testing.assert_array_equal(pipeline.load_record_image(r), pipeline.load_record_image(ref[r.image_id]))
  # A fresh process (as grain's spawned workers) opens the data source itself.
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:
    read = list(pool.map(tfds_lib.TfdsImageRef.read, [records[0].image_ref, records[-1].image_ref]))
  assert read == [records[0].image_ref.read(), records[-1].image_ref.read()]


@pytest.mark.parametrize('variant', ['boxes', 'masks'])
def test_train_batch_matches_load_coco(data, variant):
  ref = coco_lib.load_coco(data['json_path'], data['images_dir'])
  ds = tfds_lib.load_tfds(builder_dir=data[variant], split='train', category_ids=ref.category_ids)
  # TFDS shuffles examples when writing; the training plan follows record order, so put them in the JSON's.
  got = _by_id(ds)
  ds.records = [got[r.image_id] for r in ref.records]
  config = tiny.get_config()
  loop.resolve_classes(config, ds)
  ref_config = tiny.get_config()
  loop.resolve_classes(ref_config, ref)
  assert config == ref_config
  batch = next(pipeline.make_train_iterator(ds, config, global_batch_size=2, num_workers=0))
  want = next(pipeline.make_train_iterator(ref, ref_config, global_batch_size=2, num_workers=0))
  assert batch.keys() == want.keys()
  assert batch['image'].shape[0] == 2
  assert (batch['gt_classes'] > 0).any()
  for key in ('image', 'image_size', 'orig_size', 'image_id', 'scale', 'gt_classes', 'valid', 'index'):
    np.testing.assert_array_equal(batch[key], want[key], err_msg=key)
  np.testing.assert_allclose(batch['gt_boxes'], want['gt_boxes'], rtol=0, atol=2 * BOX_TOL)
  if variant == 'masks':
    np.testing.assert_array_equal(batch['gt_masks'], want['gt_masks'])

"""torchvision's `retinanet_resnet50_fpn` (COCO, box AP 36.4) as a config, for its converted weights.

    python -m retinamask_jax.convert.torchvision --in retinanet_resnet50_fpn_coco-eeacb38b.pth --out serving/tv
    Detector.from_checkpoint('serving/tv').predict(images)

What it reproduces of torchvision (tests/test_convert.py compares against torchvision itself):
- network: ResNet-50 v1.5 (stride in the 3x3 conv), frozen BN (eps 1e-5, folded by the converter), FPN P3-P7 with
  P6 from P5 and P7 from ReLU(P6), 4-conv heads without GN, 9 anchors per location, 91 sigmoid classes;
- anchors: torchvision's `AnchorGenerator` (sizes x * 2^(k/3) truncated to int, rounded half-size corners, centred
  on the grid points), in (level, y, x, ratio-major anchor) order;
- box coder: weights (1, 1, 1, 1), no +1, dw/dh clamped at log(1000 / 16);
- image normalization: RGB in [0, 1], ImageNet mean / std; test size 800 / 1333;
- post-processing: score > 0.05, top 1000 candidates per level, class-wise NMS at IoU 0.5, 300 detections per image.
Classes: torchvision's label l (0..90, COCO category ids, 0 = '__background__', 'N/A' for unused ids) is our class
l + 1; `category_ids[k - 1] = k - 1` maps detections back to COCO category ids.

- input: `data.resize = 'torchvision'`: torchvision's `GeneralizedRCNNTransform` size rule (scale = min(800 /
  short, 1333 / long), sizes floor(side * scale)) and its resize (normalize, then float bilinear, align_corners
  False, no antialiasing; `transforms.resize_float_bilinear`); `data.canvas_multiple = 32`: each image padded to
  its sides rounded up to 32, as torchvision pads a one-image batch, with its P6/P7 anchor strides on such
  canvases (canvas // grid, e.g. 800 // 13 = 61: `anchors.level_strides`); `eval.bucket_canvases`: evaluation on
  the same per-image canvases. `Detector.predict`, predict.py and evaluation all take this path, so any uint8
  photo gives torchvision's `model([image / 255])` detections (tests/test_predict_parity.py).

What still differs: torchvision batches several images on the canvas of the largest one (rounded to 32), so one
image's detections near its right / bottom border depend on the other images of its batch there; here each image
has its own canvas whatever the batch (torchvision's one-image batches, as its reference evaluation runs).

Training from these weights uses this repository's losses (focal loss, smooth L1), not torchvision's L1 box loss.
"""

import math

import ml_collections

from configs import base

# torchvision.models._meta._COCO_CATEGORIES: the name of label l; our class l + 1.
COCO_CATEGORIES = (
    '__background__', 'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'N/A', 'stop sign', 'parking meter', 'bench', 'bird', 'cat', 'dog', 'horse',
    'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'N/A', 'backpack', 'umbrella', 'N/A', 'N/A', 'handbag',
    'tie', 'suitcase', 'frisbee', 'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove',
    'skateboard', 'surfboard', 'tennis racket', 'bottle', 'N/A', 'wine glass', 'cup', 'fork', 'knife', 'spoon',
    'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog', 'pizza', 'donut', 'cake',
    'chair', 'couch', 'potted plant', 'bed', 'N/A', 'dining table', 'N/A', 'N/A', 'toilet', 'N/A', 'tv', 'laptop',
    'mouse', 'remote', 'keyboard', 'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'N/A',
    'book', 'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush',
)


def get_config() -> ml_collections.ConfigDict:
  c = base.get_config()
  m = c.model
  m.num_classes = len(COCO_CATEGORIES)
  m.category_ids = tuple(range(len(COCO_CATEGORIES)))
  m.class_names = COCO_CATEGORIES
  m.backbone.depth = 50
  m.backbone.stride_in_1x1 = False  # torchvision's ResNet v1.5
  m.backbone.norm = 'frozen_bn'
  m.backbone.freeze_at = 2  # torchvision's trainable_backbone_layers=3: conv1 and layer1 frozen
  m.fpn.channels = 256
  m.fpn.norm = 'none'
  m.fpn.p6_input = 'p5'  # LastLevelP6P7(256, 256) reads P5
  m.fpn.min_level = 3
  m.fpn.max_level = 7
  m.head.width = 256
  m.head.depth = 4
  m.head.norm = 'none'
  m.head.prior_prob = 0.01
  m.anchors.preset = 'torchvision'
  m.anchors.sizes = (32, 64, 128, 256, 512)
  m.anchors.aspect_ratios = (0.5, 1.0, 2.0)
  m.anchors.scales_per_octave = 3
  m.box_coder.weights = (1.0, 1.0, 1.0, 1.0)
  m.box_coder.max_log_ratio = math.log(1000.0 / 16.0)
  m.mask.enabled = False  # a RetinaNet: the converted checkpoint has no mask head

  c.postprocess.score_threshold = 0.05
  c.postprocess.pre_nms_top_k = 1000  # torchvision's topk_candidates, per level
  c.postprocess.nms_iou = 0.5
  c.postprocess.max_detections = 300

  # torchvision's Matcher(0.5, 0.4, allow_low_quality_matches=True), for fine-tuning.
  c.matching.positive_iou = 0.5
  c.matching.negative_iou = 0.4
  c.matching.best_match_threshold = 0.0
  c.loss.self_adjusting = False

  c.data.channel_order = 'rgb'
  c.data.pixel_range = 1.0
  c.data.pixel_mean = (0.485, 0.456, 0.406)
  c.data.pixel_std = (0.229, 0.224, 0.225)
  c.data.min_sizes = (800,)
  c.data.max_size = 1333
  c.data.test_min_size = 800
  c.data.test_max_size = 1333
  # torchvision's input path: its resize (scale arithmetic, float bilinear, no antialiasing), its padding to
  # multiples of 32 per image (so its P6/P7 anchor strides, canvas // grid, follow: anchors.level_strides), and
  # evaluation on the same per-image canvases (torchvision's reference evaluation runs one image per batch).
  c.data.resize = 'torchvision'
  c.data.canvas_multiple = 32
  c.eval.bucket_canvases = True
  return c

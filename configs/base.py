"""Every knob of retinamask-jax with its default.

Defaults reproduce the authors' RetinaMask R-50-FPN 2x multi-scale model
(`retinanet_mask_R-50-FPN_2x_adjust_std011_ms`, see `shared/reference/authors_code_spec.md` 1.2), with the
global batch and learning rate written for 16 images (the LR is scaled linearly to `train.batch_size`).
Other configs import this one and change a few keys. Keys marked (traced) reach the jitted train step as data
in the `HParams` pytree, so changing them never recompiles (DESIGN.md 2.6).
"""

import math

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  # ---------------------------------------------------------------- model (static: shapes and structure)
  c.model = ml_collections.ConfigDict()
  # 0 = take the number of classes from the training dataset's categories.
  c.model.num_classes = 0
  # Filled in from the training dataset when training starts (saved with checkpoints, used by predict/export):
  # category_ids[k - 1] is the dataset category id of contiguous class k.
  c.model.category_ids = ()
  c.model.class_names = ()
  # 'float32' or 'bfloat16': dtype of convolutions and heads; params stay float32, losses are float32.
  c.model.compute_dtype = 'float32'
  # Compute 1x1 convolutions as matmuls in CPU programs: numerically the same, much faster weight gradients on CPU
  # (GPU / TPU programs keep XLA's convolution; decided per lowering platform, see models/layers.py Conv).
  c.model.conv1x1_as_matmul = True
  # Kernel gradient of the other convs: 'taps' (one matmul per kernel tap), 'xla' (XLA's weight-gradient conv),
  # 'by_size' (taps for large and grouped convs, xla for small ones), or 'auto' = by_size on CPU, xla on GPU/TPU.
  # The same variables and sums, in another order.
  c.model.conv_kernel_grad = 'auto'
  # 3x3 stride-1 convs (backbone, FPN, heads, mask head) by Winograd's algorithm (F(4x4, 3x3) or F(2x2, 3x3), by
  # size, where it pays): 'on', 'off', or 'auto' = on for float32 on CPU. Same variables; the same function up
  # to float32 rounding (~1e-5 of the largest output).
  c.model.winograd = 'auto'

  c.model.backbone = ml_collections.ConfigDict()
  c.model.backbone.depth = 50  # 18, 34, 50, 101
  c.model.backbone.groups = 1  # ResNeXt cardinality (32 for X-101-32x8d)
  c.model.backbone.width_per_group = 64  # ResNeXt bottleneck width per group (8 for X-101-32x8d)
  c.model.backbone.base_width = 64  # stem / res2 channels before expansion; < 64 gives slim CPU backbones
  c.model.backbone.stride_in_1x1 = True  # MSRA weights put the stride in the 1x1 conv; torchvision in the 3x3
  c.model.backbone.norm = 'frozen_bn'  # 'frozen_bn' (pretrained), 'group_norm' (train from scratch)
  c.model.backbone.freeze_at = 2  # 0 = nothing frozen, 1 = stem, 2 = stem + res2, ...
  # Pretrained backbone put into the fresh initialization (a resumed run's checkpoint replaces it): a directory
  # written by `python -m retinamask_jax.convert.torchvision`, a Detector export, or a torchvision ResNet .pth.
  # torchvision ResNets need stride_in_1x1=False, norm='frozen_bn' and their RGB / ImageNet normalization.
  c.model.backbone_init = ''  # '' = none

  c.model.fpn = ml_collections.ConfigDict()
  c.model.fpn.channels = 256
  c.model.fpn.norm = 'none'  # 'none' or 'group_norm' (GN after lateral and output convs)
  c.model.fpn.p6_input = 'p5'  # 'p5' (authors, torchvision v1) or 'c5' (RetinaNet paper, Detectron)
  c.model.fpn.min_level = 3
  c.model.fpn.max_level = 7

  c.model.head = ml_collections.ConfigDict()
  c.model.head.width = 256
  c.model.head.depth = 4
  c.model.head.norm = 'none'  # 'none' or 'group_norm'
  c.model.head.prior_prob = 0.01

  c.model.anchors = ml_collections.ConfigDict()
  c.model.anchors.preset = 'authors'  # 'authors' (Detectron rounding, centre at s/2) or 'torchvision'
  c.model.anchors.sizes = (32, 64, 128, 256, 512)  # base size per level, P3..P7
  c.model.anchors.aspect_ratios = (0.5, 1.0, 2.0)  # h / w
  c.model.anchors.scales_per_octave = 3

  c.model.box_coder = ml_collections.ConfigDict()
  c.model.box_coder.weights = (10.0, 10.0, 5.0, 5.0)
  c.model.box_coder.max_log_ratio = math.log(1000.0 / 16.0)  # clamp of dw, dh when decoding

  # ---------------------------------------------------------------- mask branch
  c.model.mask = ml_collections.ConfigDict()
  c.model.mask.enabled = True
  c.model.mask.min_level = 3  # ROI-Align levels (P3-P5 by default; 2 builds P2 for the mask branch only)
  c.model.mask.max_level = 5
  c.model.mask.canonical_level = 4
  c.model.mask.canonical_size = 224.0
  c.model.mask.pooler_resolution = 14
  c.model.mask.sampling_ratio = 2
  c.model.mask.aligned = False  # the authors' legacy ROI-Align
  c.model.mask.resolution = 28  # logits resolution (pooler_resolution x 2 via the deconv)
  c.model.mask.head_width = 256
  c.model.mask.head_depth = 4
  c.model.mask.proposal_iou = 0.5  # proposals with IoU >= this to a GT get a mask target
  # Proposals the mask head runs on per image in training: positives first. 0 = all (detections + GT).
  c.model.mask.max_proposals = 0
  c.model.mask.num_masks_test = 50

  # ---------------------------------------------------------------- anchor matching (traced)
  c.matching = ml_collections.ConfigDict()
  c.matching.positive_iou = 0.5
  c.matching.negative_iou = 0.4
  # Best-matching policy: 0.0 = any overlap (authors), 0.5 = plain RetinaNet, None = off.
  c.matching.best_match_threshold = config_dict.placeholder(float)
  c.matching.best_match_threshold = 0.0

  # ---------------------------------------------------------------- losses (traced unless noted)
  c.loss = ml_collections.ConfigDict()
  c.loss.focal_alpha = 0.25
  c.loss.focal_gamma = 2.0
  c.loss.self_adjusting = True  # static: self-adjusting smooth L1 on/off
  c.loss.beta = 0.11  # fixed smooth-L1 beta (used when self_adjusting is False)
  c.loss.beta_max = 0.11  # cap of the self-adjusting beta, and the initial running mean
  c.loss.self_adjusting_momentum = 0.1
  c.loss.cls_weight = 1.0
  c.loss.box_weight = 1.0
  c.loss.mask_weight = 1.0

  # ---------------------------------------------------------------- post-processing (inference and mask proposals)
  c.postprocess = ml_collections.ConfigDict()
  c.postprocess.score_threshold = 0.05
  c.postprocess.pre_nms_top_k = 1000  # per level
  c.postprocess.nms_iou = 0.4
  c.postprocess.max_detections = 100

  # ---------------------------------------------------------------- data
  c.data = ml_collections.ConfigDict()
  # Any COCO-format dataset: instances JSON + image folder. Unset: the shapes dataset is generated in the workdir.
  # Or a COCO 2017 root: <root>/annotations/instances_{train,val}2017.json and <root>/{train,val}2017/ fill the
  # four keys below where they are unset.
  c.data.coco_root = ''
  c.data.train_json = ''
  c.data.train_images = ''
  c.data.val_json = ''
  c.data.val_images = ''
  c.data.min_sizes = (640, 800, 1000)  # shorter side in training, one drawn per batch
  c.data.max_size = 1333  # longer side cap
  c.data.test_min_size = 800
  c.data.test_max_size = 1333
  # How images are resized: 'pil' (the authors' rule: short side to the size, long side capped, sizes rounded as
  # their code does; PIL bilinear on uint8, antialiased when shrinking) or 'torchvision' (torchvision's
  # GeneralizedRCNNTransform: its scale arithmetic, floor sizes, float bilinear on the normalized image, no
  # antialiasing; for converted torchvision models, see configs/torchvision_retinanet_r50.py).
  c.data.resize = 'pil'
  # Canvases are multiples of this per side (a multiple of 32, the backbone's C5 stride): training and the largest
  # test canvas per orientation round the sizes up to it, and Detector.predict (and evaluation with
  # eval.bucket_canvases) pads each image to its own sides rounded up to it. 32 is torchvision's padding; more
  # distinct canvases mean more compiled programs.
  c.data.canvas_multiple = 128
  c.data.hflip_prob = 0.5
  # Copy-paste augmentation (retinamask_jax/data/copy_paste.py): with probability `prob` a training image gets the
  # instances of another training image of its orientation group pasted onto it at their own training scale;
  # instances left with less than `min_visible` of their pixels are dropped. 0 = off (the authors' recipe).
  c.data.copy_paste = ml_collections.ConfigDict()
  c.data.copy_paste.prob = 0.0
  c.data.copy_paste.min_visible = 0.5
  # Normalization: x = (pixel * pixel_range / 255 - mean) / std, channels in channel_order.
  c.data.channel_order = 'bgr'
  c.data.pixel_range = 255.0
  c.data.pixel_mean = (102.9801, 115.9465, 122.7717)
  c.data.pixel_std = (1.0, 1.0, 1.0)
  c.data.max_instances = 100  # G: GT padded (or truncated, largest kept) to this many per image
  c.data.mask_size = 112  # M: each GT mask is cropped to its box and resized to M x M
  c.data.crowd = 'drop'  # 'drop' (authors) or 'ignore' (anchors overlapping crowd regions are ignored)
  c.data.num_workers = 2
  # Seed of the data order, multi-scale draws and flips; unset = `seed`. A sweep fixes it so that its seeds vary
  # only the initialization, and the runs of a --vmap sweep can share each batch.
  c.data.seed = config_dict.placeholder(int)
  c.data.shapes = ml_collections.ConfigDict()
  c.data.shapes.num_train = 2000
  c.data.shapes.num_val = 200
  c.data.shapes.image_size = (256, 384)  # (min, max) side of generated images
  c.data.shapes.mean_objects = 3.5  # shapes drawn per non-empty image, on average (before occlusion drops some)
  # The same for the train split alone; unset = mean_objects. Denser training images teach more per step, as
  # mosaic and copy-paste augmentation do, while the val split keeps the density it is compared at.
  c.data.shapes.train_mean_objects = config_dict.placeholder(float)
  c.data.shapes.seed = 0

  # ---------------------------------------------------------------- training
  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16  # global, split over all devices
  c.train.num_steps = 180_000
  c.train.base_lr = 0.01  # for train.lr_reference_batch images; scaled linearly to batch_size
  c.train.lr_reference_batch = 16
  c.train.lr_scale = 1.0  # (traced) multiplies the learning rate; for sweeps
  c.train.lr_steps = (120_000, 160_000)
  c.train.lr_decay = 0.1
  c.train.warmup_steps = 500
  c.train.warmup_factor = 1.0 / 3.0
  c.train.momentum = 0.9
  c.train.optimizer = 'sgd'  # 'sgd' (authors) or 'adamw' (decoupled weight decay; short from-scratch runs)
  c.train.lr_schedule = 'steps'  # 'steps' (warmup, then x lr_decay at lr_steps) or 'cosine' (warmup, cosine to 0)
  c.train.weight_decay = 1e-4  # on conv/dense kernels
  c.train.weight_decay_norm = 0.0  # on GroupNorm scales (the authors use weight_decay; their GN configs set it)
  c.train.bias_lr_factor = 2.0
  c.train.log_every_steps = 20
  # A step whose loss or gradients are NaN/Inf is never applied. 'skip': count it (`nonfinite_steps` in
  # metrics.jsonl) and go on; 'stop': end the run with an error, saving nothing after the last good checkpoint.
  c.train.nonfinite = 'skip'

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 5000
  c.checkpoint.keep = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0 = only at the end of training
  c.eval.batch_size = 8
  # False: one canvas per orientation (the largest; fewest compiled programs). True: each image on its own
  # bucketed canvas (data.canvas_multiple per side), as Detector.predict places it: results then equal predict's
  # and, with data.canvas_multiple = 32, torchvision's one-image batches; one program per canvas met.
  c.eval.bucket_canvases = False
  c.eval.max_images = 0  # 0 = all
  c.eval.num_prediction_images = 8  # validation images drawn with detections into <workdir>/predictions at the end

  # ---------------------------------------------------------------- sweep (read by `python -m retinamask_jax.sweep`)
  # What the sweep runs when no --grid / --seeds is given: the ablation configs (configs/ablation_*.py) set these,
  # so that one command trains and tabulates a paper table. train.py ignores this section.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.title = ''  # heading of sweep.md
  c.sweep.grid = ()  # --grid specs, e.g. ('matching.best_match_threshold=0.5,0.4',)
  c.sweep.labels = ()  # one row label per grid point (the paper's row names); () = the grid values
  c.sweep.seeds = 1
  c.sweep.class_columns = ()  # category names whose per-class AP gets columns in sweep.md, e.g. ('bar',)
  return c

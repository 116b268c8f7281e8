"""The GroupNorm variant (paper section 4.3, the R-101-FPN-GN model): GN in the FPN and the head towers, or none.

    python -m retinamask_jax.sweep --config configs/ablation_gn.py:shapes --workdir runs/gn  # or :coco

On the full RetinaMask method (mask branch on P3-P5, self-adjusting smooth L1 with beta_max 0.11). As the authors,
GN goes in the extra layers only (not the backbone, P6/P7, the predictors or the mask head); at COCO scale it is
decayed like the kernels (`train.weight_decay_norm` = `train.weight_decay`), as theirs. The shapes scale's backbone
is GN (from scratch) either way.
"""

import ml_collections

from configs import ablation_base


def get_config(scale: str = 'shapes') -> ml_collections.ConfigDict:
  c = ablation_base.get_config(scale)
  c.model.mask.enabled = True
  c.loss.self_adjusting = True
  c.loss.beta_max = 0.11
  # The authors decay GN scales like the kernels (SGD, 1e-4); the shapes scale's AdamW leaves norms undecayed.
  decay = c.train.weight_decay if scale == 'coco' else c.train.weight_decay_norm
  c.sweep.title = 'GroupNorm in the FPN and heads'
  c.sweep.grid = (f'model.fpn.norm,model.head.norm,train.weight_decay_norm=none:none:0.0,'
                  f'group_norm:group_norm:{decay}',)
  c.sweep.labels = ('no norm (FPN, heads)', 'GN (FPN, heads)')
  return c

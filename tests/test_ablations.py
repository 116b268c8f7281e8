"""The paper's ablation configs (configs/ablation_*.py): each is the table it names, at both scales."""

import pytest

from configs import ablation_base, ablation_best_match, ablation_gn, ablation_mask, ablation_smooth_l1
from retinamask_jax import sweep
from retinamask_jax.train import loop

TABLES = {
    'best_match': (ablation_best_match, 5),
    'smooth_l1': (ablation_smooth_l1, 4),
    'mask': (ablation_mask, 4),
    'gn': (ablation_gn, 2),
}


def _runs(module, scale):
  c = module.get_config(scale)
  grids, seeds, labels = sweep.resolve_spec(c, [], None)
  return c, sweep.expand(c, grids, seeds, labels)


def _point(runs, **overrides):
  """The first seed's run of the grid point with these values (keys with '__' for '.')."""
  want = {k.replace('__', '.'): v for k, v in overrides.items()}
  first = min(r.seed for r in runs)
  found = [r for r in runs if r.seed == first and all(r.overrides.get(k) == v for k, v in want.items())]
  assert len(found) == 1, (want, [r.name for r in runs])
  return found[0].config


def _same(a, b):
  without = (('sweep',),)
  return loop.config_key(a, without) == loop.config_key(b, without)


@pytest.mark.parametrize('scale', ablation_base.SCALES)
@pytest.mark.parametrize('table', sorted(TABLES))
def test_each_table_expands_to_valid_distinct_runs(table, scale):
  module, num_points = TABLES[table]
  c, runs = _runs(module, scale)
  assert c.sweep.title and len(runs) == 3 * num_points
  assert len({r.name for r in runs}) == len(runs)
  assert not c.sweep.labels or len(c.sweep.labels) == num_points
  for run in runs:
    loop._check_against_defaults(run.config)  # every key known, every type right
  # A seed changes the initialization only: the data order is the same for all runs of the table.
  assert len({r.config.data.seed for r in runs}) == 1


@pytest.mark.parametrize('scale', ablation_base.SCALES)
def test_the_paper_shares_one_base_row_across_tables(scale):
  """Table 1's threshold 0.0, Table 2's fixed beta 0.11 and Table 3's base are one model (36.2 AP in the paper)."""
  _, t1 = _runs(ablation_best_match, scale)
  _, t2 = _runs(ablation_smooth_l1, scale)
  _, t3 = _runs(ablation_mask, scale)
  base = _point(t1, matching__best_match_threshold=0.0)
  assert base.model.mask.enabled is False and base.loss.self_adjusting is False and base.loss.beta == 0.11
  assert _same(base, _point(t2, loss__self_adjusting=False, loss__beta=0.11))
  assert _same(base, _point(t3, model__mask__enabled=False))
  assert not _same(base, _point(t1, matching__best_match_threshold=0.5))


def test_table_rows_change_what_the_paper_changes():
  _, t2 = _runs(ablation_smooth_l1, 'coco')
  adj = _point(t2, loss__self_adjusting=True, loss__beta_max=1.0)
  assert adj.loss.beta_max == 1.0 and adj.loss.self_adjusting is True
  _, t3 = _runs(ablation_mask, 'coco')
  long = _point(t3, train__num_steps=135_000)
  assert long.model.mask.enabled and tuple(long.train.lr_steps) == (90_000, 120_000)
  p2 = _point(t3, model__mask__min_level=2)
  assert p2.model.mask.enabled and p2.train.num_steps == 90_000 and tuple(p2.train.lr_steps) == (60_000, 80_000)
  _, t3s = _runs(ablation_mask, 'shapes')  # cosine: the schedule follows num_steps, no LR steps in the grid
  assert 'train.lr_steps' not in t3s[0].overrides
  steps = ablation_base.get_config('shapes').train.num_steps
  assert _point(t3s, train__num_steps=int(1.5 * steps)).model.mask.enabled
  _, gn = _runs(ablation_gn, 'coco')
  on = _point(gn, model__fpn__norm='group_norm')
  assert on.model.head.norm == 'group_norm' and on.train.weight_decay_norm == on.train.weight_decay
  assert on.model.mask.enabled and on.loss.self_adjusting
  assert _point(gn, model__fpn__norm='none').model.head.norm == 'none'


def test_coco_scale_is_the_authors_ablation_setting():
  c = ablation_base.get_config('coco')
  assert c.model.backbone.depth == 50 and c.train.num_steps == 90_000 and tuple(c.data.min_sizes) == (800,)
  with pytest.raises(ValueError, match='scale must be one of'):
    ablation_base.get_config('imagenet')

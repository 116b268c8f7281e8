"""Sweeps (issue: ablations are data): grid parsing, tables, one compilation per sweep, vmapped runs == runs alone."""

import importlib.util
import json
import logging
import os

import jax
import numpy as np
import pytest

from configs import tiny
from retinamask_jax import sweep
from retinamask_jax.train import loop

THRESHOLDS = 'matching.best_match_threshold=0.0,0.3,0.5,0.7,off'


def test_parse_grid_types_values_like_the_config():
  c = tiny.get_config()
  g = sweep.parse_grid(THRESHOLDS, c)
  assert g.keys == ('matching.best_match_threshold',)
  assert g.points == ((0.0,), (0.3,), (0.5,), (0.7,), (None,))
  g = sweep.parse_grid('loss.self_adjusting,loss.beta_max=false:0.11,true:1', c)
  assert g.points == ((False, 0.11), (True, 1.0))
  assert isinstance(g.points[1][1], float)
  g = sweep.parse_grid('model.fpn.norm,model.head.norm=none:group_norm,off:none', c)
  assert g.points == (('none', 'group_norm'), ('off', 'none'))  # string keys keep 'none' / 'off' as strings
  g = sweep.parse_grid('model.mask.min_level,train.num_steps=2:10,3:15', c)
  assert g.points == ((2, 10), (3, 15))


@pytest.mark.parametrize('spec, message', [
    ('matching.best_match=0.1', "'matching.best_match' is not a config key"),
    ('matching=0.1', 'is a config section'),
    ('loss.self_adjusting=yes', 'takes true/false'),
    ('train.num_steps=ten', 'cannot read'),
    ('train.num_steps=1.5', 'takes a int'),
    ('loss.beta,loss.beta_max=0.1:0.2,0.3', "point '0.3' has 1 values for 2 keys"),
    ('seed=1,2', 'use --seeds'),
    ('matching.best_match_threshold', 'expected'),
])
def test_bad_grids_name_the_problem(spec, message):
  with pytest.raises(sweep.SweepError, match=message):
    sweep.parse_grid(spec, tiny.get_config())


def test_expand_is_the_product_times_seeds_with_the_data_order_pinned():
  c = tiny.get_config()
  c.seed = 7
  grids = [sweep.parse_grid('matching.best_match_threshold=0.0,off', c), sweep.parse_grid('loss.beta_max=0.11,1.0', c)]
  runs = sweep.expand(c, grids, 3)
  assert len(runs) == 12 and len({r.name for r in runs}) == 12
  assert {r.seed for r in runs} == {7, 8, 9}
  assert all(r.config.data.seed == 7 for r in runs)
  off = [r for r in runs if r.overrides['matching.best_match_threshold'] is None]
  assert len(off) == 6 and all(r.config.matching.best_match_threshold is None for r in off)
  # Traced knobs and seeds do not split a vmap group; a structural switch does.
  assert len(sweep.vmap_groups(runs)) == 1
  runs += sweep.expand(c, [sweep.parse_grid('loss.self_adjusting=false', c)], 1)
  assert len(sweep.vmap_groups(runs)) == 2


def test_markdown_table_hand_worked():
  rows = [
      {'overrides': {'a.t': 0.5}, 'bbox/AP': 0.30, 'bbox/AP50': 0.5, 'bbox/AP75': 0.2, 'bbox/APs': 0.1,
       'bbox/APm': 0.2, 'bbox/APl': -1.0, 'train_seconds': 10.0},
      {'overrides': {'a.t': 0.5}, 'bbox/AP': 0.32, 'bbox/AP50': 0.5, 'bbox/AP75': 0.2, 'bbox/APs': 0.1,
       'bbox/APm': 0.2, 'bbox/APl': -1.0, 'train_seconds': 20.0},
      {'overrides': {'a.t': None}, 'bbox/AP': 0.25, 'bbox/AP50': 0.4, 'bbox/AP75': 0.1, 'bbox/APs': 0.0,
       'bbox/APm': 0.3, 'bbox/APl': -1.0, 'train_seconds': 5.0},
  ]
  lines = sweep.markdown_table(rows, ['a.t']).splitlines()
  assert lines[0] == '| t | box AP | box AP50 | box AP75 | box APs | box APm | box APl | seeds | train s |'
  # mean 31.0, sample std of (30, 32) = 1.414; -1 (no objects of that size) shows as '-'
  assert lines[2] == '| 0.5 | 31.0 ± 1.4 | 50.0 ± 0.0 | 20.0 ± 0.0 | 10.0 ± 0.0 | 20.0 ± 0.0 | - | 2 | 15 |'
  assert lines[3] == '| off | 25.0 | 40.0 | 10.0 | 0.0 | 30.0 | - | 1 | 5 |'



def test_rows_keep_per_category_ap_and_none_for_no_objects():
  run = sweep.Run(name='r', overrides={'a.t': 0.5}, seed=0, config=None, label='')
  row = sweep._row(run, {'bbox/AP': 0.3, 'bbox/APl': None, 'bbox/AP-bar': 0.125, 'eval_seconds': 2.0})
  assert row['bbox/AP-bar'] == 0.125 and row['bbox/APl'] is None and 'eval_seconds' not in row
  assert sweep._cell([None, None]) == '-' and sweep._cell([0.3, None, 0.32]) == '31.0 ± 1.4'
  rows = [dict(row, train_seconds=1.0), dict(row, train_seconds=3.0, **{'bbox/AP-bar': 0.175})]
  lines = sweep.markdown_table(rows, ['a.t'], classes=['bar']).splitlines()
  assert lines[0].endswith('| box APl | box AP-bar | seeds | train s |')
  assert lines[2] == '| 0.5 | 30.0 ± 0.0 | - | - | - | - | - | 15.0 ± 3.5 | 2 | 2 |'

def _sweep_config():
  c = tiny.get_config()
  # The ablation tables' gamma (configs/ablation_base.py), under which the tolerances below were measured. With the
  # default recipe's gamma 1 the problem is better conditioned: an LR x (1 + 1e-6) drifts 2.8e-5 by step 10, not
  # 8e-4, still above the 1e-5 that vmapped and lone runs could then be held to.
  c.loss.focal_gamma = 2.0
  c.train.num_steps = 10
  c.train.log_every_steps = 1
  c.checkpoint.every_steps = 5
  c.eval.max_images = 4
  c.eval.num_prediction_images = 0
  return c


def _losses(workdir, name):
  with open(os.path.join(workdir, 'runs', name, 'metrics.jsonl')) as f:
    records = [json.loads(line) for line in f]
  train = [r for r in records if r.get('kind', 'train') == 'train']
  assert [r['step'] for r in train] == list(range(1, 11))
  return np.array([r['loss'] for r in train])


class _CompileLog(logging.Handler):
  """Counts JAX's 'Compiling jit(train_step)' log lines (jax_log_compiles): a count independent of the jit cache."""

  def __init__(self):
    super().__init__(logging.WARNING)
    self.count = 0

  def emit(self, record):
    self.count += 'Compiling jit(train_step)' in record.getMessage()


@pytest.fixture(scope='module')
def sweeps(tmp_path_factory):
  """The same 5-point threshold sweep, sequential and --vmap, 10 steps per run, metrics at every step."""
  loop._PROGRAMS.clear()  # other tests of this process may have built the same program
  root = tmp_path_factory.mktemp('sweeps')
  c = _sweep_config()
  grids = [sweep.parse_grid(THRESHOLDS, c)]
  log = _CompileLog()
  logging.getLogger('jax').addHandler(log)
  jax.config.update('jax_log_compiles', True)
  try:
    rows = sweep.run_sweep(c, str(root / 'seq'), grids)
    seq_logged, log.count = log.count, 0
    vrows = sweep.run_sweep(c, str(root / 'vmap'), grids, vmap=True)
    vmap_logged = log.count
  finally:
    jax.config.update('jax_log_compiles', False)
    logging.getLogger('jax').removeHandler(log)
  return dict(root=root, config=c, grids=grids, rows=rows, vrows=vrows, seq_logged=seq_logged,
              vmap_logged=vmap_logged)


def test_a_threshold_sweep_compiles_the_train_step_once(sweeps):
  assert [r['train_step_compilations'] for r in sweeps['rows']] == [1, 0, 0, 0, 0]
  assert sweeps['seq_logged'] == 1


def test_a_vmap_sweep_compiles_once_in_total(sweeps):
  vrows = sweeps['vrows']
  assert sum(r['train_step_compilations'] for r in vrows) == 1
  assert sweeps['vmap_logged'] == 1
  assert all(r['runs_in_program'] == 5 and r['mode'] == 'vmap' for r in vrows)


def _all_losses(sweeps, kind):
  return {r['overrides']['matching.best_match_threshold']: _losses(sweeps['root'] / kind, r['name'])
          for r in sweeps['rows']}


def test_vmapped_runs_track_the_same_runs_alone(sweeps):
  """Step 1 (before any update) is the same computation: equal to float rounding for every run, so each run
  gets its own hparams and nothing leaks between runs. Later steps drift apart (see the next test)."""
  alone, vmapped = _all_losses(sweeps, 'seq'), _all_losses(sweeps, 'vmap')
  for t in alone:
    np.testing.assert_allclose(vmapped[t][0], alone[t][0], rtol=1e-6, err_msg=str(t))
    np.testing.assert_allclose(vmapped[t], alone[t], rtol=2e-2, err_msg=str(t))
  # The threshold really is traced: 0.0 and 0.3 match more anchors than plain matching; 0.5 is plain matching.
  # Over the 10 steps, not at step 1: whether the first batch holds a box whose best anchor IoU is under 0.5 is luck
  # of the data (3.5 % of shapes-v2 boxes at this size), and once one batch differs the runs part for good.
  assert np.abs(alone[0.0] - alone[None]).max() > 1e-3
  np.testing.assert_allclose(alone[0.5], alone[None], rtol=1e-6)


@pytest.fixture(scope='module')
def perturbed(sweeps):
  """10-step losses of the threshold-0.5 run alone again, with its learning rate scaled by 1 + 1e-6 (a traced
  knob: the same compiled program)."""
  c = sweeps['config']
  grids = [sweep.parse_grid('matching.best_match_threshold,train.lr_scale=0.5:1.000001', c)]
  (row,) = sweep.run_sweep(c, str(sweeps['root'] / 'perturbed'), grids)
  assert row['train_step_compilations'] == 0
  return _losses(sweeps['root'] / 'perturbed', row['name'])


def test_ten_step_losses_resolve_no_better_than_1e_4(sweeps, perturbed):
  """Why the vmapped runs are held to 2e-2 over 10 steps and not to the 1e-5 first asked for: this training
  problem amplifies any perturbation at float32 rounding level to ~1e-3 within 10 steps, so no two differently
  compiled programs (vmapped vs alone, 1 vs 8 devices, another XLA version) can agree to 1e-5 there.

  Measured (2 CPU cores, 2026-12-01): the run alone with its LR x (1 + 1e-6) drifts 8e-4 by step 10 (AdamW; 1.2e-2
  with SGD); the vmapped run drifts 5e-3 from the run alone, starting at 5e-5 after the first update, because the
  two programs' forward passes already differ by ~1e-6 relative (XLA fuses the batched program differently).
  Should the problem ever become well-conditioned, this test fails and the 1e-5 comparison becomes meaningful.
  """
  alone = _all_losses(sweeps, 'seq')[0.5]
  rel = np.abs(perturbed - alone) / np.abs(alone)
  assert rel[0] == 0.0  # step 1 runs before any update: the LR does not enter
  assert rel.max() > 1e-4, rel


def test_sweep_writes_normal_run_dirs_tables_and_resumes(sweeps):
  root, vrows = sweeps['root'], sweeps['vrows']
  for row in vrows:
    run_dir = root / 'vmap' / 'runs' / row['name']
    assert (run_dir / 'checkpoints' / '10').is_dir()
    assert (run_dir / 'eval' / 'step_10' / 'bbox_results.json').exists()
    assert 'bbox/AP' in row and 'segm/AP' in row
  table = (root / 'vmap' / 'sweep.md').read_text()
  assert table.count('\n') == 2 + 5
  if importlib.util.find_spec('matplotlib'):  # the learning curves, one per run (optional dependency)
    assert (root / 'vmap' / 'curves.png').stat().st_size > 0 and (root / 'seq' / 'curves.png').stat().st_size > 0
  evals = [json.loads(ln) for ln in (root / 'vmap' / 'runs' / vrows[0]['name'] / 'metrics.jsonl').open()]
  assert [r['wall_seconds'] > 0 for r in evals if r.get('kind') == 'eval'] == [True]
  assert json.loads((root / 'vmap' / 'sweep.json').read_text()) == vrows
  # Finished runs are not run again.
  before = {p: p.stat().st_mtime for p in (root / 'seq' / 'runs').glob('*/metrics.jsonl')}
  again = sweep.run_sweep(sweeps['config'], str(root / 'seq'), sweeps['grids'])
  assert again == sweeps['rows']
  assert {p: p.stat().st_mtime for p in before} == before


# ------------------------------------------------------------------------------------------------ ablation configs


def test_grid_values_may_be_bracketed_tuples():
  c = tiny.get_config()
  g = sweep.parse_grid('train.num_steps,train.lr_steps=10:(6,8),15:(9, 12,)', c)
  assert g.points == ((10, (6, 8)), (15, (9, 12)))
  g = sweep.parse_grid('data.min_sizes=(128,),(128,256)', c)
  assert g.points == (((128,),), ((128, 256),))
  with pytest.raises(sweep.SweepError, match='unbalanced'):
    sweep.parse_grid('data.min_sizes=(128,', c)
  with pytest.raises(sweep.SweepError, match='unbalanced'):
    sweep.parse_grid('data.min_sizes=128),(3', c)


def test_labels_name_the_points_and_head_the_table():
  c = tiny.get_config()
  grids = [sweep.parse_grid('loss.beta=1.0,0.11', c)]
  runs = sweep.expand(c, grids, 2, labels=('wide', 'narrow'))
  assert [r.label for r in runs] == ['wide', 'wide', 'narrow', 'narrow']
  with pytest.raises(sweep.SweepError, match='3 labels for the 2 points'):
    sweep.expand(c, grids, 1, labels=('a', 'b', 'c'))
  rows = [{'overrides': r.overrides, 'label': r.label, 'bbox/AP': 0.1 * i, 'train_seconds': 1.0}
          for i, r in enumerate(runs)]
  for row in rows:
    row.update({f'bbox/{m}': 0.0 for m in sweep.METRICS[1:]})
  lines = sweep.markdown_table(rows, ['loss.beta']).splitlines()
  assert lines[0].startswith('| setting | beta | box AP |')
  # wide: AP 0 and 10 -> 5.0 ± 7.1; narrow: 20 and 30 -> 25.0 ± 7.1
  assert lines[2].startswith('| wide | 1.0 | 5.0 ± 7.1 |')
  assert lines[3].startswith('| narrow | 0.11 | 25.0 ± 7.1 |')


def test_resolve_spec_takes_the_configs_table_unless_flags_are_given():
  from configs import ablation_smooth_l1

  c = ablation_smooth_l1.get_config('shapes')
  grids, seeds, labels = sweep.resolve_spec(c, [], None)
  assert seeds == 3 and len(labels) == 4 and grids[0].keys == ('loss.self_adjusting', 'loss.beta', 'loss.beta_max')
  grids, seeds, labels = sweep.resolve_spec(c, ['loss.beta=1.0'], 1)
  assert seeds == 1 and labels == () and grids[0].points == ((1.0,),)
  grids, seeds, labels = sweep.resolve_spec(tiny.get_config(), [], None)
  assert grids == [] and seeds == 1 and len(sweep.expand(tiny.get_config(), grids, seeds)) == 1

"""Sweeps: the runs of one config that differ in a few keys, trained, evaluated and tabulated in one command.

    python -m retinamask_jax.sweep --config configs/tiny.py --workdir runs/table1 \\
        --grid 'matching.best_match_threshold=0.5,0.4,0.3,0.2,0.0' --seeds 3 [--vmap] [--config.x=y ...]

Every `--grid` adds a factor to a cartesian product; one grid may set several keys together (zipped):
`--grid 'loss.self_adjusting,loss.beta_max=false:0.11,true:0.11,true:1.0'`. `--seeds S` repeats every point with
`seed` = config.seed + 0..S-1; the data order stays that of the config (`data.seed` is pinned), so a sweep's seeds
vary the initialization only and a point's runs see the same batches.

The paper's ablations are configs that carry their table (`sweep.grid`, `sweep.labels`, `sweep.seeds` = 3), at COCO
or shapes scale: `python -m retinamask_jax.sweep --config configs/ablation_best_match.py:shapes --workdir runs/t1`
(Table 1; `ablation_smooth_l1` is Table 2, `ablation_mask` Table 3, `ablation_gn` the GroupNorm variant).

Runs are written to `<workdir>/runs/<name>/` (an ordinary train.py workdir: checkpoints, metrics.jsonl, eval/), one
row per run to `<workdir>/sweep.json` and the paper's table format (mean and spread over seeds) to
`<workdir>/sweep.md`, the learning curves of every run to `<workdir>/curves.png`. Re-running the command skips
finished runs and resumes unfinished ones.

Continuous knobs are traced (`HParams`, DESIGN.md 2.6), so runs that differ only in them, or in the seed, share one
compiled train step: a threshold sweep compiles once. With `--vmap` such runs also train as one program, their
states stacked on a leading axis (sharded on a `sweep` mesh axis of `--sweep_devices` devices beside `data`), each
batch shared by all of them. Runs that differ in structure (mask on/off, levels, depth) form separate programs.
"""

from __future__ import annotations

import ast
import dataclasses
import itertools
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from retinamask_jax.hparams import CONFIG_KEYS as HPARAM_CONFIG_KEYS
from retinamask_jax.train.loop import ConfigError

METRICS = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')


class SweepError(ConfigError):
  """A sweep specification that cannot work (named key, value or count)."""


@dataclasses.dataclass(frozen=True)
class Grid:
  """One factor of the product: `keys` set together to each tuple of `points`."""

  keys: tuple[str, ...]
  points: tuple[tuple[Any, ...], ...]


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict[str, Any]  # the grid point, key -> value
  seed: int
  config: ml_collections.ConfigDict
  label: str = ''  # the point's row name in the table ('' = its values)


# ------------------------------------------------------------------------------------------------ specification


def _lookup(config: ml_collections.ConfigDict, key: str) -> Any:
  node: Any = config
  for name in key.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or name not in node:
      raise SweepError(f'--grid: {key!r} is not a config key')
    node = node[name]
  if isinstance(node, ml_collections.ConfigDict):
    raise SweepError(f'--grid: {key!r} is a config section, not a key')
  return node


def _parse_value(token: str, current: Any, key: str) -> Any:
  """`token` as the type of the key's current value (bool, int, float, str, tuple); 'none' / 'off' = None, except
  for string keys, whose values they may be."""
  text = token.strip()
  if isinstance(current, str):
    return text  # string keys take 'none' as a value of their own (model.fpn.norm='none')
  if text.lower() in ('none', 'off'):
    return None
  if isinstance(current, bool) or text.lower() in ('true', 'false'):
    if text.lower() not in ('true', 'false'):
      raise SweepError(f'--grid: {key} takes true/false, got {token!r}')
    return text.lower() == 'true'
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if text.lower() in ('inf', '+inf'):
      return math.inf
    raise SweepError(f'--grid: cannot read {token!r} as a value of {key}') from None
  if current is None:
    return value
  if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
    value = float(value)
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  if not isinstance(value, type(current)):
    raise SweepError(f'--grid: {key} takes a {type(current).__name__}, got {token!r}')
  return value


def _split_top(text: str, sep: str) -> list[str]:
  """`text` split at the `sep`s outside brackets: '(1,2),(3,)' -> ['(1,2)', '(3,)']."""
  parts, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
      if depth < 0:
        raise SweepError(f'--grid: unbalanced brackets in {text!r}')
    elif char == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  if depth:
    raise SweepError(f'--grid: unbalanced brackets in {text!r}')
  return parts + [text[start:]]


def parse_grid(spec: str, config: ml_collections.ConfigDict) -> Grid:
  """'a.b=1,2,3' or 'a.b,c.d=1:x,2:y' -> Grid, values typed like the config's current values; tuple values
  in brackets ('data.min_sizes=(224,256),(288,)')."""
  if '=' not in spec:
    raise SweepError(f"--grid {spec!r}: expected 'key=v1,v2,...' or 'key1,key2=v1:w1,v2:w2'")
  lhs, rhs = spec.split('=', 1)
  keys = tuple(k.strip() for k in lhs.split(','))
  if 'seed' in keys:
    raise SweepError('--grid: use --seeds for seeds')
  currents = [_lookup(config, k) for k in keys]
  points = []
  for item in _split_top(rhs, ','):
    tokens = _split_top(item, ':') if len(keys) > 1 else [item]
    if len(tokens) != len(keys):
      raise SweepError(f'--grid {spec!r}: point {item!r} has {len(tokens)} values for {len(keys)} keys')
    points.append(tuple(_parse_value(t, c, k) for t, c, k in zip(tokens, currents, keys)))
  if not points:
    raise SweepError(f'--grid {spec!r}: no values')
  return Grid(keys, tuple(points))


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *sections, name = key.split('.')
  node = config
  for section in sections:
    node = node[section]
  node[name] = tuple(value) if isinstance(value, list) else value


def _format(value: Any) -> str:
  return 'off' if value is None else str(value).replace('/', '_').replace(' ', '')


def expand(
    config: ml_collections.ConfigDict, grids: Sequence[Grid], num_seeds: int, labels: Sequence[str] = ()
) -> list[Run]:
  """The cartesian product of `grids` x `num_seeds` seeds, each as its own config (data order pinned);
  `labels`, if given, name the product's points in order."""
  if num_seeds < 1:
    raise SweepError(f'--seeds must be >= 1, got {num_seeds}')
  num_points = math.prod(len(g.points) for g in grids)
  if labels and len(labels) != num_points:
    raise SweepError(f'sweep.labels: {len(labels)} labels for the {num_points} points of the grid')
  keys = [k for g in grids for k in g.keys]
  if len(set(keys)) != len(keys):
    raise SweepError(f'--grid: a key appears in two grids: {keys}')
  data_seed = int(config.seed if config.data.get('seed') is None else config.data.seed)
  runs = []
  for index, combo in enumerate(itertools.product(*[g.points for g in grids])):
    overrides = {k: v for g, point in zip(grids, combo) for k, v in zip(g.keys, point)}
    for i in range(num_seeds):
      seed = int(config.seed) + i
      c = ml_collections.ConfigDict(config.to_dict())
      with c.unlocked():
        for k, v in overrides.items():
          _set(c, k, v)
        c.seed = seed
        c.data.seed = data_seed
      name = ','.join([f'{k}={_format(v)}' for k, v in overrides.items()] + [f'seed={seed}'])
      runs.append(Run(name, overrides, seed, c, labels[index] if labels else ''))
  return runs


# What runs of one vmapped program may differ in: the traced knobs and the seed.
_VMAPPABLE = (('seed',),) + tuple(tuple(key.split('.')) for key in HPARAM_CONFIG_KEYS.values())


def vmap_groups(runs: Sequence[Run]) -> list[list[Run]]:
  """Runs that may train as one program: equal in everything but the traced knobs and the seed."""
  from retinamask_jax.train import loop

  groups: dict[str, list[Run]] = {}
  for run in runs:
    groups.setdefault(loop.config_key(run.config, _VMAPPABLE), []).append(run)
  return list(groups.values())


# ------------------------------------------------------------------------------------------------ running


def _row_path(workdir: str, run: Run) -> str:
  return os.path.join(workdir, 'runs', run.name, 'sweep_row.json')


def _read_row(workdir: str, run: Run) -> dict[str, Any] | None:
  path = _row_path(workdir, run)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _write_row(workdir: str, run: Run, row: dict[str, Any]) -> None:
  path = _row_path(workdir, run)
  with open(path + '.tmp', 'w') as f:
    json.dump(row, f, indent=1)
  os.replace(path + '.tmp', path)


def _row(run: Run, metrics: dict[str, float], **extra: Any) -> dict[str, Any]:
  row = {'name': run.name, 'overrides': run.overrides, 'seed': run.seed}
  if run.label:
    row['label'] = run.label
  # Every COCO figure, the per-category `bbox/AP-<name>` ones included; None = nothing to score (no such objects).
  row.update({k: None if v is None else float(v) for k, v in metrics.items() if k.startswith(('bbox/', 'segm/'))})
  row.update(extra)
  return row


def _shared_data(config: ml_collections.ConfigDict, workdir: str) -> tuple[Any, Any]:
  """Point the config at the sweep's data (the shapes dataset is generated once, in `<workdir>/data`) and set
  its classes, so that every run sees the same files and the same program key from the start."""
  from retinamask_jax.train import loop

  train, val = loop.prepare_datasets(config, workdir)
  loop.resolve_classes(config, train)
  with config.unlocked():
    config.data.train_json, config.data.train_images = train.json_path, train.images_dir
    if val is not None:
      config.data.val_json, config.data.val_images = val.json_path, val.images_dir
  return train, val


def _run_sequential(run: Run, workdir: str) -> dict[str, Any]:
  from retinamask_jax.train import loop

  program = loop.train_program(run.config)
  step_fn = program.jitted_step(loop.make_mesh())
  before = step_fn._cache_size()
  start = time.perf_counter()
  metrics = loop.train_and_evaluate(run.config, os.path.join(workdir, 'runs', run.name))
  seconds = time.perf_counter() - start
  return _row(run, metrics, mode='sequential', train_seconds=seconds - metrics.get('eval_seconds', 0.0),
              eval_seconds=metrics.get('eval_seconds', 0.0), runs_in_program=1,
              train_step_compilations=int(step_fn._cache_size() - before))


def _run_vmapped(
    runs: list[Run], workdir: str, group_dir: str, sweep_devices: int, datasets: tuple[Any, Any]
) -> list[dict[str, Any]]:
  """Train `runs` (one vmap group) as one program, then save and evaluate each run on its own."""
  import jax.numpy as jnp
  from jax.sharding import Mesh, NamedSharding
  from jax.sharding import PartitionSpec as P

  from retinamask_jax.data import pipeline as pipeline_lib
  from retinamask_jax.hparams import HParams
  from retinamask_jax.train import loop
  from retinamask_jax.train.checkpoint import Checkpointer
  from retinamask_jax.train.metrics_writer import MetricsWriter, ProgressBar

  config = runs[0].config
  num_runs, devices = len(runs), jax.devices()
  if jax.process_count() > 1:
    raise SweepError('--vmap sweeps run in one process (use a sequential sweep across hosts)')
  if len(devices) % sweep_devices or num_runs % sweep_devices:
    raise SweepError(f'--sweep_devices={sweep_devices} must divide the {len(devices)} devices and the '
                     f'{num_runs} runs of each vmapped program')
  data_devices = len(devices) // sweep_devices
  if config.train.batch_size % data_devices:
    raise SweepError(f'train.batch_size = {config.train.batch_size} is not divisible by the {data_devices} '
                     'devices of the data axis')
  mesh = Mesh(np.asarray(devices).reshape(sweep_devices, data_devices), ('sweep', 'data'))
  stacked_sharding = NamedSharding(mesh, P('sweep'))
  data_sharding = NamedSharding(mesh, P('data'))
  train_ds, val_ds = datasets

  program = loop.train_program(config)
  step_fn = program.vmapped_step(mesh)
  compilations_before = step_fn._cache_size()
  states = [program.create_state(run.config, jax.random.key(run.seed)) for run in runs]
  state = jax.tree.map(lambda *xs: jnp.stack(xs), *states)
  del states
  checkpointer = Checkpointer(os.path.join(group_dir, 'checkpoints'), keep=config.checkpoint.keep)
  data_state: dict[str, Any] = {}
  if checkpointer.latest_step() is not None:
    state, data_state = checkpointer.restore(state, sharding=stacked_sharding)
  # The configs are the source of truth for the traced knobs.
  state = state.replace(hparams=jax.tree.map(lambda *xs: jnp.stack(xs), *[HParams.from_config(r.config)
                                                                            for r in runs]))
  state = jax.device_put(state, stacked_sharding)
  start_step = int(state.step[0])
  num_steps = config.train.num_steps
  run_dirs = [os.path.join(workdir, 'runs', run.name) for run in runs]
  writers = [MetricsWriter(d) for d in run_dirs]
  for writer in writers:
    writer.truncate_after(start_step)

  batches = pipeline_lib.make_train_iterator(
      train_ds, config, global_batch_size=config.train.batch_size, process_index=0, process_count=1,
      start_index=int(data_state.get('next_index', start_step)),
  )
  step_seeds = jnp.asarray([run.seed + 1 for run in runs], jnp.uint32)
  rngs_at = jax.jit(jax.vmap(lambda seed, step: jax.random.fold_in(jax.random.key(seed), step), (0, None)))
  bar = ProgressBar(num_steps, start_step, every=config.train.log_every_steps,
                    desc=f'{num_runs} runs as one program')
  step, start = start_step, time.perf_counter()
  last_log_time, last_log_step = start, start_step
  with loop._Preemption() as preemption:
    while step < num_steps:
      batch = next(batches)
      inputs = {k: jax.make_array_from_process_local_data(data_sharding, batch[k]) for k in loop.TRAIN_KEYS}
      state, metrics = step_fn(state, inputs, rngs_at(step_seeds, step))
      step += 1
      if step % config.train.log_every_steps == 0 or step == num_steps:
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        images_per_s = (step - last_log_step) * config.train.batch_size * num_runs / max(now - last_log_time, 1e-9)
        last_log_time, last_log_step = now, step
        for i, writer in enumerate(writers):
          record = {k: float(v[i]) for k, v in metrics.items()}
          record.update(images_per_s=images_per_s / num_runs, canvas=list(batch['image'].shape[1:3]),
                        train_step_compilations=int(step_fn._cache_size()))
          writer.write(step, record)
        losses = ' '.join(f'{v:.3f}' for v in np.asarray(metrics['loss']))
        bar.update(step, f'loss {losses} {images_per_s:.1f} img/s')
      else:
        bar.update(step)
      if step % config.checkpoint.every_steps == 0 or step == num_steps or preemption.signum is not None:
        checkpointer.save(step, state, {'next_index': step}, config)
      if preemption.signum is not None:
        checkpointer.close()
        bar.close()
        print(f'Stopped by signal {preemption.signum} at step {step}; re-run the same command to resume.',
              flush=True)
        raise SystemExit(128 + preemption.signum)
  bar.close()
  checkpointer.close()
  train_seconds = time.perf_counter() - start
  compilations = int(step_fn._cache_size() - compilations_before)

  rows = []
  eval_mesh = loop.make_mesh()
  host_state = jax.device_get(state)
  for i, (run, run_dir, writer) in enumerate(zip(runs, run_dirs, writers)):
    if _read_row(workdir, run) is not None:
      rows.append(_read_row(workdir, run))
      continue
    run_state = jax.tree.map(lambda x, i=i: x[i], host_state)
    run_checkpointer = Checkpointer(os.path.join(run_dir, 'checkpoints'), keep=config.checkpoint.keep)
    run_checkpointer.save(step, run_state, {'next_index': step}, run.config)
    run_checkpointer.close()
    metrics = {}
    if val_ds is not None:
      metrics = loop.run_evaluation(run.config, program.model, run_state.variables, val_ds,
                                    os.path.join(run_dir, 'eval', f'step_{step}'), eval_mesh)
      # The run's wall time as its row counts it: its share of the program's training, then its evaluation.
      wall = train_seconds / num_runs + metrics.get('eval_seconds', 0.0)
      writer.write(step, {**metrics, 'wall_seconds': wall}, kind='eval')
    writer.close()
    row = _row(run, metrics, mode='vmap', train_seconds=train_seconds / num_runs,
               eval_seconds=metrics.get('eval_seconds', 0.0), runs_in_program=num_runs,
               train_step_compilations=compilations if i == 0 else 0)
    _write_row(workdir, run, row)
    rows.append(row)
  return rows


def run_sweep(
    config: ml_collections.ConfigDict,
    workdir: str,
    grids: Sequence[Grid],
    num_seeds: int = 1,
    *,
    vmap: bool = False,
    sweep_devices: int = 1,
    labels: Sequence[str] = (),
    title: str = '',
    class_columns: Sequence[str] = (),
) -> list[dict[str, Any]]:
  """Train and evaluate every run of the sweep that has not finished; write sweep.json and sweep.md.

  Returns the rows (one per run, finished earlier or now): name, overrides, seed, `bbox/AP`.. and `segm/AP`..
  (fractions, as COCOeval prints them), mode, train_seconds (a vmapped run's share of its program's time),
  eval_seconds, runs_in_program and train_step_compilations (new compilations this run caused; a vmapped
  program's are counted on its first run), and `label` when `labels` name the grid's points (the table's first
  column; `title` heads sweep.md). `class_columns` names categories whose per-class AP gets columns in sweep.md
  (every row keeps all of them in sweep.json either way).
  """
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  config = ml_collections.ConfigDict(config.to_dict())
  datasets = _shared_data(config, workdir)
  runs = expand(config, grids, num_seeds, labels)
  names = [r.name for r in runs]
  if len(set(names)) != len(names):
    raise SweepError('two runs of the sweep have the same name; give distinct grid values')
  print(f'sweep: {len(runs)} runs -> {workdir}', flush=True)
  rows: dict[str, dict[str, Any]] = {}
  for run in runs:
    row = _read_row(workdir, run)
    if row is not None:
      row.pop('label', None)
      if run.label:
        row['label'] = run.label
      rows[run.name] = row
  todo = [r for r in runs if r.name not in rows]
  if len(todo) < len(runs):
    print(f'sweep: {len(runs) - len(todo)} runs finished earlier, {len(todo)} to go', flush=True)
  if vmap:
    for index, group in enumerate(vmap_groups(todo)):
      print(f'sweep: program {index}: {len(group)} runs ({", ".join(r.name for r in group)})', flush=True)
      group_dir = os.path.join(workdir, 'programs', '+'.join(sorted(r.name for r in group))[:200])
      for row in _run_vmapped(group, workdir, group_dir, sweep_devices, datasets):
        rows[row['name']] = row
  else:
    for index, run in enumerate(todo):
      print(f'sweep: run {index + 1}/{len(todo)}: {run.name}', flush=True)
      row = _run_sequential(run, workdir)
      _write_row(workdir, run, row)
      rows[run.name] = row
  ordered = [rows[r.name] for r in runs]
  keys = [k for g in grids for k in g.keys]
  with open(os.path.join(workdir, 'sweep.json'), 'w') as f:
    json.dump(ordered, f, indent=1)
  table = markdown_table(ordered, keys, class_columns)
  if title:
    table = f'## {title}\n\n{table}'
  with open(os.path.join(workdir, 'sweep.md'), 'w') as f:
    f.write(table)
  print(table, flush=True)
  _plot_sweep(workdir, runs, title)
  return ordered


def _plot_sweep(workdir: str, runs: Sequence[Run], title: str) -> None:
  """`<workdir>/curves.png`: AP against step and wall time and the loss, one curve per run."""
  from retinamask_jax.evaluation import plots

  records = {f'{r.label} s{r.seed}' if r.label else r.name:
             plots.read_metrics(os.path.join(workdir, 'runs', r.name, 'metrics.jsonl')) for r in runs}
  path = plots.plot_runs(records, os.path.join(workdir, plots.CURVES_FILE), title=title)
  if path:
    print(f'learning curves: {path}', flush=True)


# ------------------------------------------------------------------------------------------------ tables


def _cell(values: list[float]) -> str:
  """AP in percent, mean and, over several seeds, the sample standard deviation."""
  # None (or COCOeval's -1 in rows of older runs) = no objects in that size range
  values = [100.0 * v for v in values if v is not None and v >= 0]
  if not values:
    return '-'
  if len(values) == 1:
    return f'{values[0]:.1f}'
  return f'{np.mean(values):.1f} ± {np.std(values, ddof=1):.1f}'


def markdown_table(rows: Sequence[dict[str, Any]], keys: Sequence[str], classes: Sequence[str] = ()) -> str:
  """The paper's table format: one line per grid point, AP / AP50 / AP75 / APs / APm / APl for box (and mask),
  then the per-class AP of each of `classes` (box, and mask), mean ± sample std over the seeds, then the number of
  seeds and the mean train time. Rows with a `label` (the paper's row names) show it in a first column."""
  points: dict[str, list[dict[str, Any]]] = {}
  for row in rows:
    points.setdefault(json.dumps([row['overrides'].get(k) for k in keys], default=repr), []).append(row)
  kinds = [k for k in ('bbox', 'segm') if any(f'{k}/AP' in r for r in rows)]
  short = [k.split('.')[-1] for k in keys]
  labelled = any('label' in r for r in rows)
  header = (['setting'] if labelled else []) + short
  columns = [(kind, m) for kind in kinds for m in METRICS] + [(kind, f'AP-{c}') for c in classes for kind in kinds]
  header += [f'{"box" if kind == "bbox" else "mask"} {m}' for kind, m in columns]
  header += ['seeds', 'train s']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for group in points.values():
    cells = [group[0].get('label', '')] if labelled else []
    cells += [_format(group[0]['overrides'].get(k)) for k in keys]
    cells += [_cell([r[f'{kind}/{m}'] for r in group if f'{kind}/{m}' in r]) for kind, m in columns]
    cells += [str(len(group)), f'{np.mean([r["train_seconds"] for r in group]):.0f}']
    lines.append('| ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


# ------------------------------------------------------------------------------------------------ command line


def resolve_spec(
    config: ml_collections.ConfigDict, grid_flags: Sequence[str] | None, seeds_flag: int | None
) -> tuple[list[Grid], int, tuple[str, ...]]:
  """The grids, seeds and row labels to run: the flags where given, else the config's `sweep` section (an
  ablation config carries its paper table there). A --grid replaces the config's grid and its labels; no grid at
  all is one point (the config itself, e.g. over seeds)."""
  if grid_flags:
    specs, labels = list(grid_flags), ()
  else:
    specs, labels = list(config.sweep.grid), tuple(config.sweep.labels)
  grids = [parse_grid(spec, config) for spec in specs]
  return grids, int(config.sweep.seeds if seeds_flag is None else seeds_flag), labels


def main(argv: Sequence[str]) -> None:
  import sys

  from absl import flags

  from retinamask_jax import cli

  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  f = flags.FLAGS

  def sweep():
    import jax

    from retinamask_jax.train.workdir import WorkdirLock

    config = f['config'].value
    grids, seeds, labels = resolve_spec(config, f.grid, f.seeds)
    # One writer per sweep directory (issue 22): a second sweep on it stops here, naming the first.
    with WorkdirLock(f.workdir, enabled=jax.process_index() == 0, what='sweep'):
      return run_sweep(config, f.workdir, grids, seeds, vmap=f.vmap, sweep_devices=f.sweep_devices,
                       labels=labels, title=config.sweep.title, class_columns=tuple(config.sweep.class_columns))

  cli.run(sweep)


def _define_flags() -> None:
  from absl import flags
  from ml_collections import config_flags

  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  config_flags.DEFINE_config_file('config', os.path.join(here, 'configs', 'shapes.py'), 'Base config of the sweep.')
  flags.DEFINE_string('workdir', 'runs/sweep', 'Sweep directory: runs/<name>/, sweep.json, sweep.md.')
  flags.DEFINE_multi_string('grid', [], "'key=v1,v2,..' or 'key1,key2=v1:w1,v2:w2' (zipped); repeat for a product. "
                            "Default: the config's sweep.grid (the ablation configs set it).")
  flags.DEFINE_integer('seeds', None, 'Runs per grid point, with seed = config.seed + 0..seeds-1 '
                       '(default: the config\'s sweep.seeds, 1 in configs/base.py).')
  flags.DEFINE_bool('vmap', False, 'Train runs that differ only in traced knobs and seeds as one program.')
  flags.DEFINE_integer('sweep_devices', 1, 'With --vmap: devices on the sweep mesh axis (the rest on data).')


if __name__ == '__main__':
  from absl import app

  from retinamask_jax import cli, host_malloc

  host_malloc.reexec_with_host_malloc()  # as train.py: tcmalloc or huge pages for XLA's buffers
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)

"""Learning curves from `<workdir>/metrics.jsonl`: box / mask AP against step and against wall time, and the loss.

`train.py` writes `<workdir>/curves.png` after every evaluation; the sweep writes `<workdir>/curves.png` with one
curve per run. matplotlib is an optional dependency (in requirements.txt, so installed by default): without it the
plots are skipped with one info line and nothing else changes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from typing import Any

CURVES_FILE = 'curves.png'


def read_metrics(path: str) -> list[dict[str, Any]]:
  """The JSON lines of a metrics.jsonl (unreadable lines, e.g. one cut by a crash, are skipped)."""
  records = []
  if not os.path.exists(path):
    return records
  with open(path) as f:
    for line in f:
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
  return records


def curves(records: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
  """The series to plot, each a list of (x, y) sorted by step:
  `box_ap_step`, `mask_ap_step` (AP in percent at each evaluation), `box_ap_wall`, `mask_ap_wall` (the same
  against `wall_seconds / 60` where the eval lines carry it), `loss` (train lines' total loss against step)."""
  out: dict[str, list[tuple[float, float]]] = {k: [] for k in
                                                ('box_ap_step', 'mask_ap_step', 'box_ap_wall', 'mask_ap_wall', 'loss')}
  for r in sorted(records, key=lambda r: r.get('step', 0)):
    if r.get('kind') == 'eval':
      for kind, name in (('bbox', 'box'), ('segm', 'mask')):
        value = r.get(f'{kind}/AP')
        if not isinstance(value, int | float) or value < 0:
          continue
        out[f'{name}_ap_step'].append((r['step'], 100 * value))
        if isinstance(r.get('wall_seconds'), int | float):
          out[f'{name}_ap_wall'].append((r['wall_seconds'] / 60, 100 * value))
    elif 'kind' not in r and isinstance(r.get('loss'), int | float):
      out['loss'].append((r['step'], r['loss']))
  return out


_told_missing = False


def _pyplot() -> Any:
  global _told_missing
  try:
    import matplotlib
  except ImportError:
    if not _told_missing:  # one line per process, not one per evaluation
      _told_missing = True
      print('info: matplotlib is not installed, so no learning-curve plots (pip install matplotlib)', flush=True)
    return None
  matplotlib.use('Agg')  # files only, no display needed
  import matplotlib.pyplot as plt

  return plt


def plot_runs(runs: dict[str, Sequence[dict[str, Any]]], out_path: str, *, title: str = '') -> str | None:
  """One PNG of three panels: AP against step, AP against wall time, training loss against step; one curve per
  run (box AP solid, mask AP dashed, one colour per run). runs: {label: metrics.jsonl records}. Returns the path
  written, or None when matplotlib is missing or there is nothing to plot."""
  series = {label: curves(records) for label, records in runs.items()}
  if not any(any(s.values()) for s in series.values()):
    return None
  plt = _pyplot()
  if plt is None:
    return None
  # Past a few runs, per-panel legends cover the points: one legend for the figure goes below the panels.
  shared_legend = len(series) > 4
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
  single = len(series) == 1
  for i, (label, s) in enumerate(series.items()):
    colour = colours[i % len(colours)]
    for ax, axis in ((axes[0], 'step'), (axes[1], 'wall')):
      for name, style in (('box', '-'), ('mask', '--')):
        points = s[f'{name}_ap_{axis}']
        if points:
          xs, ys = zip(*points)
          ax.plot(xs, ys, style, marker='o', markersize=3, color=colour,
                  label=f'{name} AP' if single else f'{label} {name}')
    if s['loss']:
      xs, ys = zip(*s['loss'])
      axes[2].plot(xs, ys, color=colour, linewidth=1, label=None if single else label)
  axes[0].set(xlabel='step', ylabel='AP (%)', title='AP (IoU 0.50:0.95) vs step')
  axes[1].set(xlabel='wall time (min, compile and evaluation included)', ylabel='AP (%)', title='AP vs wall time')
  axes[2].set(xlabel='step', ylabel='loss', title='training loss (total)')
  if any(s['loss'] and min(y for _, y in s['loss']) > 0 for s in series.values()):
    axes[2].set_yscale('log')
  if not any(s['box_ap_wall'] or s['mask_ap_wall'] for s in series.values()):
    axes[1].text(0.5, 0.5, 'no wall_seconds on the eval lines\n(metrics.jsonl of an older run)', ha='center',
                 va='center', transform=axes[1].transAxes, color='gray')
  for ax in axes:
    ax.grid(alpha=0.3)
    if not shared_legend and ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7 if len(series) > 3 else 9)
  if title:
    fig.suptitle(title)
  if shared_legend:
    handles, labels = axes[0].get_legend_handles_labels()
    legend_height = 0.15 * math.ceil(len(handles) / 3) + 0.15
    fig.set_size_inches(15, 4.2 + legend_height)
    fig.legend(handles, labels, loc='lower center', ncol=3, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, legend_height / (4.2 + legend_height), 1, 1))
  else:
    fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  fig.savefig(out_path, dpi=100)
  plt.close(fig)
  return out_path


def plot_workdir(workdir: str) -> str | None:
  """`<workdir>/curves.png` from `<workdir>/metrics.jsonl` (what train.py writes after each evaluation)."""
  records = read_metrics(os.path.join(workdir, 'metrics.jsonl'))
  return plot_runs({os.path.basename(os.path.normpath(workdir)): records}, os.path.join(workdir, CURVES_FILE))

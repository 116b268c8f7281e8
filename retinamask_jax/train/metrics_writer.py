"""Where training progress goes: `<workdir>/metrics.jsonl`, TensorBoard event files, and a console progress bar.

metrics.jsonl holds one JSON object per line: train lines `{"step", "loss", ...}` and eval lines
`{"step", "kind": "eval", "bbox/AP", ...}`. After a resume from step s, lines of steps > s (logged after the
checkpoint the run restarts from) are dropped before anything is appended, so each step appears exactly once
however often the run is interrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO


def _jsonable(value: Any) -> Any:
  if hasattr(value, 'tolist'):
    value = value.tolist()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/Inf; keep them visible rather than invalid
  return value


class MetricsWriter:
  """Appends metrics to metrics.jsonl and TensorBoard (process 0 only; other processes pass enabled=False)."""

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), flush_secs=30)

  def read(self) -> list[dict[str, Any]]:
    if not os.path.exists(self.path):
      return []
    with open(self.path) as f:
      return [json.loads(line) for line in f if line.strip()]

  def truncate_after(self, step: int) -> int:
    """Drop lines with step > `step` (and a torn last line); returns how many were dropped."""
    if not self.enabled or not os.path.exists(self.path):
      return 0
    kept, dropped = [], 0
    with open(self.path) as f:
      for line in f:
        try:
          record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill mid-write
          dropped += 1
          continue
        if record.get('step', 0) > step:
          dropped += 1
        else:
          kept.append(line if line.endswith('\n') else line + '\n')
    if dropped:
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(kept)
      os.replace(tmp, self.path)
    return dropped

  def write(self, step: int, metrics: dict[str, Any], kind: str = 'train') -> None:
    if not self.enabled:
      return
    record = {'step': int(step)}
    if kind != 'train':
      record['kind'] = kind
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
      f.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k not in ('step', 'kind') and isinstance(v, int | float):
          self._tb.add_scalar(f'{kind}/{k}', v, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


class ProgressBar:
  """A one-line console progress bar with ETA; plain lines every `every` updates when not on a terminal."""

  def __init__(self, total: int, start: int = 0, *, desc: str = 'train', stream: TextIO | None = None,
               enabled: bool = True, every: int = 20, width: int = 24):
    self.total, self.count, self.desc = total, start, desc
    self.stream = stream or sys.stderr
    self.enabled = enabled
    self.every = max(every, 1)
    self.width = width
    self.tty = hasattr(self.stream, 'isatty') and self.stream.isatty()
    self._t0 = time.perf_counter()
    self._start = start
    self._postfix = ''
    self._closed = False

  def update(self, count: int, postfix: str | None = None) -> None:
    self.count = count
    if postfix is not None:
      self._postfix = postfix
    if not self.enabled:
      return
    if self.tty or count == self.total or (count - self._start) % self.every == 0:
      self._render()

  def _render(self) -> None:
    done = self.count - self._start
    elapsed = time.perf_counter() - self._t0
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (self.total - self.count) / rate if rate > 0 else float('nan')
    frac = self.count / max(self.total, 1)
    bar = '#' * int(frac * self.width)
    eta_text = _format_seconds(eta) if math.isfinite(eta) else '--:--'
    line = (f'{self.desc} [{bar:<{self.width}}] {self.count}/{self.total} '
            f'{_format_seconds(elapsed)}<{eta_text} {self._postfix}')
    if self.tty:
      self.stream.write('\r' + line[:200].ljust(120))
    else:
      self.stream.write(line + '\n')
    self.stream.flush()

  def close(self) -> None:
    """Ends the bar's line on a terminal; closing again does nothing."""
    if self.enabled and self.tty and not self._closed:
      self.stream.write('\n')
      self.stream.flush()
    self._closed = True

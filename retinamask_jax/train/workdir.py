"""The workdir of a run: one writer at a time, and restoring past damaged checkpoints.

- `WorkdirLock`: `fcntl.flock` on `<workdir>/train.lock`, taken by process 0 before the run touches anything in
  the workdir. A second run on the same workdir (a copy-pasted launch script) is refused at once by name of the
  run that holds it (pid, host, start time and command line, which the holder writes into the file). The kernel
  drops the lock when its holder dies, kill -9 included, so there are no stale locks to clean up; the descriptor is
  not inherited by exec'ed children. The file itself stays (removing it would let a third run lock a new file
  while the second still holds the old one).
- `restore_newest_intact`: the newest checkpoint that restores. A damaged one (truncated or missing array files,
  unreadable metadata) is named on one line with the reason and skipped; the writer renames it aside to
  `checkpoints/<step>.damaged` so that nothing is deleted; readers (eval.py, `Detector.from_checkpoint`) only skip
  it, since a training run may be using the same directory.
"""

from __future__ import annotations

import datetime
import fcntl
import os
import socket
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # this module stays light (no jax, no orbax): train.py takes the lock before importing them
  from retinamask_jax.train.checkpoint import DamagedCheckpointError

LOCK_FILE = 'train.lock'
T = TypeVar('T')
# Locks this process holds: path -> [descriptor, depth]. Re-entrant, since a second flock on a new descriptor of the
# same file would conflict with this process's own (cli.train takes it early, train_and_evaluate again).
_HELD: dict[str, list[int]] = {}


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir's lock."""


class WorkdirLock:
  """Context manager: holds `<workdir>/train.lock` exclusively (when `enabled`; other processes of a multi-host run
  pass enabled=False, the lock belongs to process 0). Raises WorkdirBusyError when another process holds it."""

  def __init__(self, workdir: str, *, enabled: bool = True, what: str = 'run'):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self.enabled = enabled
    self.what = what
    self._fd: int | None = None

  def __enter__(self) -> WorkdirLock:
    if not self.enabled:
      return self
    if self.path in _HELD:
      _HELD[self.path][1] += 1
      self._fd = _HELD[self.path][0]
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 4096, 0).decode('utf-8', 'replace').strip() or 'a process that has not said which'
      os.close(fd)
      raise WorkdirBusyError(
          f'{self.workdir} is in use by another {self.what}: {holder}; wait for it to end, stop it, or use another '
          '--workdir') from None
    started = datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')
    command = ' '.join([os.path.basename(sys.executable)] + sys.argv)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f'pid {os.getpid()} on host {socket.gethostname()}, since {started}: {command}\n'.encode(), 0)
    self._fd = fd
    _HELD[self.path] = [fd, 1]
    return self

  def __exit__(self, *exc: Any) -> None:
    if self._fd is None:
      return
    self._fd = None
    _HELD[self.path][1] -= 1
    if _HELD[self.path][1] == 0:
      fd = _HELD.pop(self.path)[0]
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)


def restore_newest_intact(
    steps: list[int],
    restore: Callable[[int], T],
    on_damaged: Callable[[DamagedCheckpointError, int | None], None],
) -> tuple[int, T] | None:
  """`(step, restore(step))` for the newest of `steps` whose restore does not raise DamagedCheckpointError, or None
  when none restores. `on_damaged(error, next_step)` is called for each damaged one (next_step: the one tried next,
  None when it was the last)."""
  from retinamask_jax.train.checkpoint import DamagedCheckpointError

  steps = sorted(steps, reverse=True)
  for i, step in enumerate(steps):
    try:
      return step, restore(step)
    except DamagedCheckpointError as e:
      on_damaged(e, steps[i + 1] if i + 1 < len(steps) else None)
  return None


def report_damaged(error: DamagedCheckpointError, next_step: int | None, *, set_aside_as: str | None = None,
                   doing: str = 'resuming from') -> None:
  """One line on stderr: which step is damaged, why, where it was put, and what happens instead."""
  kept = f'; set aside as {set_aside_as}' if set_aside_as else ''
  then = f'{doing} step {next_step} instead' if next_step is not None else 'no earlier checkpoint to fall back to'
  print(f'warning: checkpoint {error.step} in {error.directory} is damaged ({error.reason}){kept}; {then}',
        file=sys.stderr, flush=True)

"""Polite preemption: SIGTERM / SIGINT become a flag that the loop checks after each step; it then saves a
checkpoint and exits with 128 + the signal. A second signal while it saves stops waiting (KeyboardInterrupt)."""

from __future__ import annotations

import signal
from typing import Any


class Preemption:
  """Context manager: `signum` is None until SIGTERM or SIGINT arrives, then that signal's number.

  Outside the main thread signals cannot be handled, and the previous handlers are left alone.
  """

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, Any] = {}

  def __enter__(self) -> Preemption:
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread: leave signals alone
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:  # a second signal: stop waiting
      raise KeyboardInterrupt
    self.signum = signum

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

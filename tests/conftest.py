"""Shared test setup: the repo root on sys.path (for `configs`), one persistent JAX compilation cache for the whole
run, hypothesis profiles."""

import os
import shutil
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

# Most heavy tests train `configs/tiny.py`, in this process or in `train.py` subprocesses, and each would compile the
# same train and predict programs again (compilation is most of their time on 2 cores). One persistent cache per
# test run compiles each program once: the controller (or a run without xdist) makes it, and the xdist workers and
# every subprocess inherit it through the environment. A hit loads the executable XLA built for the same program
# and flags, so results are the same bits; programs with other XLA_FLAGS (the multi-device checks) have other keys.
# Programs that compile in under 0.2 s are not worth a file each.
# The workers and subprocesses also run as train.py does, with XLA's large per-call buffers on huge pages
# (retinamask_jax.host_malloc; glibc reads it at process start, so the controller itself runs without it).
if 'PYTEST_XDIST_WORKER' not in os.environ:
  os.environ['JAX_COMPILATION_CACHE_DIR'] = tempfile.mkdtemp(prefix='retinamask-jax-tests-')
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.2'
  from retinamask_jax import host_malloc  # noqa: E402

  if host_malloc.applies():
    os.environ.update(host_malloc.env_with_hugepage_malloc(os.environ))
import jax  # noqa: E402

# JAX read the variables when it was first imported, which may have been before they were set (a plugin).
jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs',
                  float(os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS']))


def pytest_sessionfinish(session):
  if 'PYTEST_XDIST_WORKER' not in os.environ:  # after every worker has finished
    shutil.rmtree(os.environ['JAX_COMPILATION_CACHE_DIR'], ignore_errors=True)


# Hypothesis: jit compiles on first call, so the first example is slow; no deadline, modest example counts.
settings.register_profile('default', deadline=None, max_examples=60, derandomize=True)
settings.register_profile('thorough', deadline=None, max_examples=1000)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'default'))


def _has_torchvision() -> bool:
  try:
    import torch  # noqa: F401
    import torchvision  # noqa: F401
  except Exception:  # noqa: BLE001  (any import failure means: no reference available)
    return False
  return True


HAS_TORCHVISION = _has_torchvision()
requires_torchvision = pytest.mark.skipif(not HAS_TORCHVISION, reason='torch/torchvision not installed')

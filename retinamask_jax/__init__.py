"""retinamask-jax: RetinaMask (Fu, Shvets, Berg 2019) in JAX/Flax.

Stable public API (DESIGN.md section 8): `build_model`, `Detector`, and the ops/losses named there.
Heavy submodules are imported on first use so that `import retinamask_jax` stays cheap.
"""

from typing import Any

__version__ = '0.1.0'
__all__ = ['Detector', 'HParams', 'build_model']


def __getattr__(name: str) -> Any:
  if name == 'build_model':
    from retinamask_jax.models.retinamask import build_model

    return build_model
  if name == 'Detector':
    from retinamask_jax.export import Detector

    return Detector
  if name == 'HParams':
    from retinamask_jax.hparams import HParams

    return HParams
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

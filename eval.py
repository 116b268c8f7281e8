"""Evaluate a checkpoint: `python eval.py --config ... --workdir runs/x [--step N]` -> COCO bbox + segm AP.

Reads the latest (or `--step`) checkpoint of `<workdir>/checkpoints/`, writes the COCO results JSON and the AP
tables under `<workdir>/eval/step_<N>/`.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from retinamask_jax import cli, host_malloc

_HERE = os.path.dirname(os.path.abspath(__file__))
_CONFIG = config_flags.DEFINE_config_file(
    'config', os.path.join(_HERE, 'configs', 'shapes.py'), 'Experiment config file.', lock_config=True
)
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Directory holding checkpoints/.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step to evaluate (default: the latest).')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  cli.run(cli.evaluate, _CONFIG.value, _WORKDIR.value, step=_STEP.value)


if __name__ == '__main__':
  host_malloc.reexec_with_host_malloc()  # before any work: the dynamic linker and glibc read it at process start
  app.run(main, flags_parser=cli.parse_flags)

"""Train RetinaMask, then evaluate: `python train.py [--config configs/x.py] [--workdir dir] [--config.a.b=v]`.

With no flags this trains the embedded default (the synthetic shapes dataset, a CPU-sized model) and prints box and
mask AP. Re-running the same command resumes from the latest checkpoint in `<workdir>/checkpoints/`.
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
_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Directory for checkpoints, logs and results.')


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments {argv[1:]}')
  cli.run(cli.train, _CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  host_malloc.reexec_with_host_malloc()  # before any work: the dynamic linker and glibc read it at process start
  app.run(main, flags_parser=cli.parse_flags)

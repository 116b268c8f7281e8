"""Draw a trained model's detections on images: `python predict.py --workdir runs/x --images a.jpg b.png --out vis/`.

Loads the latest checkpoint in `<workdir>/checkpoints/` (with the config it was trained with), runs the detector on
each image at the config's test size, and writes `<out>/<image name>.png` with boxes, class names, scores and masks,
plus `<out>/detections.json` (boxes in the pixels of the upright image at full resolution, dataset category ids).

Images that cannot be used (missing, not an image, truncated, over `transforms.MAX_IMAGE_PIXELS` pixels) are skipped,
each named on one line `skipped <file>: <reason>` on stderr and as `{"file_name", "error"}` in detections.json; the
others are still predicted. Exit code 0, or 2 when every image was skipped.
"""

import sys

from absl import app, flags

from retinamask_jax import cli, host_malloc

_WORKDIR = flags.DEFINE_string('workdir', 'runs/default', 'Training workdir (or a checkpoints / step directory).')
_IMAGES = flags.DEFINE_multi_string('images', [], 'Image files (repeat the flag, or list them after --images).')
_OUT = flags.DEFINE_string('out', None, 'Output directory (default: <workdir>/predictions).')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default: the latest).')
_SCORE = flags.DEFINE_float('score_threshold', 0.3, 'Draw detections with at least this score.')


def main(argv):
  # `--images a.jpg b.jpg`: absl gives the flag the first file and leaves the rest as arguments.
  images = list(_IMAGES.value) + list(argv[1:])
  if not images:
    sys.exit('error: no images given (--images a.jpg b.jpg)')
  cli.run(cli.predict, _WORKDIR.value, images, _OUT.value, step=_STEP.value, score_threshold=_SCORE.value)


if __name__ == '__main__':
  host_malloc.reexec_with_host_malloc()  # before any work: the dynamic linker and glibc read it at process start
  app.run(main, flags_parser=cli.parse_flags)

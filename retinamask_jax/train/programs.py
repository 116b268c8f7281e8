"""Train programs: what every run of one model structure shares within a process.

Runs whose configs differ only in what the compiled train step does not read (seeds, data, the traced knobs of
DESIGN.md 2.6, bookkeeping) have the same `program_key` and share one `TrainProgram`: the module, its initializer,
the optimizer definition and the jitted step, hence one compilation per canvas for a whole sweep.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import jax
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from retinamask_jax import losses
from retinamask_jax.data import pipeline as pipeline_lib
from retinamask_jax.hparams import CONFIG_KEYS as HPARAM_CONFIG_KEYS
from retinamask_jax.hparams import HParams
from retinamask_jax.models import retinamask as retinamask_lib
from retinamask_jax.train import optim
from retinamask_jax.train.state import TrainState
from retinamask_jax.train.step import make_predict_fn, make_train_step

# Arrays of the batch contract (DESIGN.md 4) that the jitted train step reads.
TRAIN_KEYS = ('image', 'image_size', 'gt_boxes', 'gt_classes', 'gt_masks')


def create_train_state(
    config: ml_collections.ConfigDict,
    model: Any,
    init_variables: Any,
    rng: jax.Array,
    tx: optax.GradientTransformation | None = None,
) -> TrainState:
  """A fresh state from `rng`; `tx` (default: built from the config) is the optimizer definition."""
  del model  # the variables come from init_variables
  variables = init_variables(rng, first_canvas(config))
  # From this run's config: a program shared by a beta_max sweep was built with another point's value.
  variables['loss_stats'] = losses.init_loss_stats(config.loss.beta_max)
  if config.model.get('backbone_init'):
    # Pretrained (converted) backbone over the fresh init; the optimizer state below is created from it.
    from retinamask_jax.convert import init_backbone

    variables = init_backbone(variables, config)
  if tx is None:
    tx = optim.make_optimizer(
        config, variables['params'], retinamask_lib.frozen_params_mask(variables['params'], config)
    )
  return TrainState.create(variables, tx, HParams.from_config(config))


def first_canvas(config: ml_collections.ConfigDict) -> tuple[int, int]:
  """The (H, W) of the first training canvas: the shapes the initializer traces with."""
  return next(iter(pipeline_lib.train_canvases(tuple(config.data.min_sizes), config.data.max_size).values()))


# Config entries the compiled train step does not read: the traced knobs arrive in state.hparams, the seeds only
# change the data and the initial values, and the rest is bookkeeping outside the step.
_NOT_IN_PROGRAM = (
    ('seed',), ('data',), ('eval',), ('checkpoint',), ('train', 'log_every_steps'),
    ('model', 'category_ids'), ('model', 'class_names'), ('model', 'backbone_init'), ('train', 'nonfinite'),
    ('sweep',),
) + tuple(tuple(key.split('.')) for key in HPARAM_CONFIG_KEYS.values())


def config_key(config: ml_collections.ConfigDict, without: tuple[tuple[str, ...], ...]) -> str:
  """`config` as canonical JSON with the entries at the paths `without` (e.g. ('train', 'lr_scale')) removed."""
  tree = config.to_dict()
  for path in without:
    node = tree
    for name in path[:-1]:
      node = node.get(name, {})
    node.pop(path[-1], None)
  return json.dumps(tree, sort_keys=True, default=repr)


def program_key(config: ml_collections.ConfigDict) -> str:
  """The part of `config` the compiled train step depends on, as canonical JSON.

  Runs whose keys are equal (e.g. the points of a best-match-threshold sweep, or several seeds) share one
  `TrainProgram`, hence one compilation per canvas.
  """
  return config_key(config, _NOT_IN_PROGRAM)


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """What every run with the same `program_key` shares within a process: the module, its initializer, the
  optimizer definition, the pure train step, and its compiled forms (one per mesh and kind)."""

  model: Any
  init_variables: Any
  tx: optax.GradientTransformation
  step_fn: Any  # train_step(state, batch, rng) -> (state, metrics), pure
  compiled: dict[Any, Any] = dataclasses.field(default_factory=dict, compare=False, repr=False)

  def create_state(self, config: ml_collections.ConfigDict, rng: jax.Array) -> TrainState:
    return create_train_state(config, self.model, self.init_variables, rng, tx=self.tx)

  def jitted_step(self, mesh: Mesh) -> Any:
    """The step jitted for a replicated state and a batch sharded on `mesh`'s `data` axis; state donated."""
    key = ('jit', mesh)
    if key not in self.compiled:
      replicated = NamedSharding(mesh, P())
      self.compiled[key] = jax.jit(self.step_fn, donate_argnums=(0,), out_shardings=(replicated, replicated))
    return self.compiled[key]

  def vmapped_step(self, mesh: Mesh) -> Any:
    """`step(states, batch, rngs)` over states and rngs stacked on a leading run axis (sharded on `mesh`'s
    `sweep` axis) and one batch shared by every run (sharded on `data`): several runs as one program."""
    key = ('vmap', mesh)
    if key not in self.compiled:
      stacked = NamedSharding(mesh, P('sweep'))
      self.compiled[key] = jax.jit(
          jax.vmap(self.step_fn, in_axes=(0, None, 0)), donate_argnums=(0,), out_shardings=(stacked, stacked)
      )
    return self.compiled[key]

  def predictor(self, config: ml_collections.ConfigDict, with_masks: bool) -> Any:
    """Jitted `predict(variables, images, image_size)` (see `make_predict_fn`)."""
    key = ('predict', with_masks)
    if key not in self.compiled:
      self.compiled[key] = jax.jit(make_predict_fn(self.model, config, with_masks))
    return self.compiled[key]


_PROGRAMS: dict[str, TrainProgram] = {}


def train_program(config: ml_collections.ConfigDict) -> TrainProgram:
  """The shared `TrainProgram` of `config` (built on first use in this process)."""
  key = program_key(config)
  if key not in _PROGRAMS:
    model, init_variables = retinamask_lib.build_model(config)
    params = jax.eval_shape(lambda rng: init_variables(rng, first_canvas(config)), jax.random.key(0))['params']
    tx = optim.make_optimizer(config, params, retinamask_lib.frozen_params_mask(params, config))
    _PROGRAMS[key] = TrainProgram(model, init_variables, tx, make_train_step(model, config))
  return _PROGRAMS[key]

"""SGD with model parallelism, alone (`sgd`) or with data parallelism (`sync_sgd`).

The seed: "Model parallelism partitions the neural network across P processors, i.e.,
parallelizes the matrix operations across the processors." The devices form a (data, model)
mesh; every layer is split across the `model` axis as easgd_jax/partitioning.py lays out, and
each batch across the `data` axis. The step is the one every algorithm uses,
W <- W + u(Delta W) (core.make_sgd_step), compiled once for the mesh and the parameter layout:
the mean loss over the whole batch makes XLA sum the data-parallel gradients, and the parameter
shardings make it split the matrix operations. `--model_parallel > 1` with `--algorithm=sgd` or
`sync_sgd` runs this class (their `from_config` hands over to it).
"""

from typing import Any, NamedTuple

import jax

from easgd_jax import core, devices, partitioning
from easgd_jax.algorithms.base import Defaults


class ModelParallelState(NamedTuple):
  params: Any  # W, each layer split across the model axis
  opt_state: Any  # sharded like W
  step: int


class ModelParallelSGD(Defaults):
  name = "sgd"  # or sync_sgd: the registry's entries hand over to this class
  model_parallel = True

  def __init__(
    self,
    loss_fn,
    *,
    data_parallel,
    model_parallel,
    learning_rate=None,
    momentum=0.0,
    optimizer=None,
  ):
    core.check_hyperparameters(data_parallel=data_parallel, model_parallel=model_parallel)
    self.mesh = devices.mesh(data_parallel, model_parallel, (partitioning.DATA, partitioning.MODEL))
    self.devices = list(self.mesh.devices.flat)
    self.model_parallel = model_parallel
    self.batches_per_step = data_parallel  # per-device batches of --batch_size per step
    self.local_ids = list(range(data_parallel))
    self.max_in_flight = devices.max_in_flight(self.devices)
    self.eval_placement = partitioning.replicated(self.mesh)  # test set: whole on every device
    self.optimizer = core.inner_or_default(optimizer, learning_rate, momentum)
    self._sgd_step = core.make_sgd_step(loss_fn, self.optimizer)
    self._batch_sharding = partitioning.batch_sharding(self.mesh)
    self._compiled = {}  # parameter layout -> (param shardings, jitted init, jitted step)

  @classmethod
  def from_config(cls, config, loss_fn, available_devices=None):
    data, model = config.mesh_shape
    return cls(
      loss_fn,
      data_parallel=data,
      model_parallel=model,
      optimizer=cls.inner_optimizer(config),
    )

  def _for_layout(self, params_host):
    """The shardings and jitted functions for this parameter layout, built once per layout."""
    layout = jax.tree.structure(params_host), tuple(x.shape for x in jax.tree.leaves(params_host))
    if layout not in self._compiled:
      partitioning.check_divisible(params_host, self.model_parallel)
      param_shardings = partitioning.shardings(params_host, self.mesh)
      # The optimizer state follows W's layout; its scalars (step counts) sit on the whole mesh.
      replicated = partitioning.replicated(self.mesh)
      params = devices.put(params_host, param_shardings)
      found = jax.jit(self.optimizer.init).lower(params).compile().output_shardings
      opt_shardings = jax.tree.map(lambda s: s if _on(s, self.mesh) else replicated, found)
      init = jax.jit(self.optimizer.init, out_shardings=opt_shardings)
      step = jax.jit(self._sgd_step, out_shardings=(param_shardings, opt_shardings, replicated))
      self._compiled[layout] = param_shardings, init, step
    return self._compiled[layout]

  def init(self, params_host) -> ModelParallelState:
    param_shardings, init, _ = self._for_layout(params_host)
    params = devices.put(params_host, param_shardings)
    return ModelParallelState(params, init(params), 0)

  def step(self, state: ModelParallelState, batch_host):
    """batch_host: [b, ...], or [data, b, ...] from the data-parallel sampler (flattened)."""
    if self.batches_per_step > 1:
      batch_host = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch_host)
    batch = devices.put(batch_host, self._batch_sharding)
    _, _, step = self._for_layout(state.params)
    params, opt_state, loss = step(state.params, state.opt_state, batch)
    return ModelParallelState(params, opt_state, state.step + 1), loss

  def eval_params(self, state: ModelParallelState):
    return state.params


def _on(sharding, mesh):
  return isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh == mesh

"""SGD with model parallelism, alone (`sgd`) or with data parallelism (`sync_sgd`).

The seed: "Model parallelism partitions the neural network across P processors, i.e.,
parallelizes the matrix operations across the processors." The devices form a (data, model)
mesh; every layer is split across the `model` axis as easgd_jax/partitioning.py lays out, and
each batch across the `data` axis. The step is the one every algorithm uses,
W <- W - eta * Delta W (core.make_sgd_step), compiled once for the mesh: the mean loss over the
whole batch makes XLA sum the data-parallel gradients, and the parameter shardings make it split
the matrix operations.
"""

from typing import Any, NamedTuple

import jax

from easgd_jax import core, devices, partitioning


class ModelParallelState(NamedTuple):
  params: Any  # W, each layer split across the model axis
  opt_state: Any  # sharded like W
  step: int


class ModelParallelSGD:
  def __init__(self, loss_fn, *, data_parallel, model_parallel, learning_rate, momentum=0.0):
    core.check_hyperparameters(
      learning_rate=learning_rate,
      momentum=momentum,
      data_parallel=data_parallel,
      model_parallel=model_parallel,
    )
    self.mesh = devices.mesh(data_parallel, model_parallel, (partitioning.DATA, partitioning.MODEL))
    self.devices = list(self.mesh.devices.flat)
    self.model_parallel = model_parallel
    self.replicas = data_parallel  # per-device batches of --batch_size per step
    self.local_ids = list(range(data_parallel))
    self.max_in_flight = devices.max_in_flight(self.devices)
    self.eval_placement = partitioning.replicated(self.mesh)  # test set: whole on every device
    self.optimizer = core.local_optimizer(learning_rate, momentum)
    self._sgd_step = core.make_sgd_step(loss_fn, self.optimizer)
    self._batch_sharding = partitioning.batch_sharding(self.mesh)

  def init(self, params_host) -> ModelParallelState:
    partitioning.check_divisible(params_host, self.model_parallel)
    param_shardings = partitioning.shardings(params_host, self.mesh)
    params = devices.put(params_host, param_shardings)
    opt_state = jax.jit(self.optimizer.init)(params)  # the momentum trace follows W's layout
    opt_shardings = jax.tree.map(lambda x: x.sharding, opt_state)
    self._step = jax.jit(
      self._sgd_step,
      out_shardings=(param_shardings, opt_shardings, partitioning.replicated(self.mesh)),
    )
    return ModelParallelState(params, opt_state, 0)

  def step(self, state: ModelParallelState, batch_host):
    """batch_host: [b, ...], or [data, b, ...] from the data-parallel sampler (flattened)."""
    if self.replicas > 1:
      batch_host = jax.tree.map(lambda x: x.reshape(-1, *x.shape[2:]), batch_host)
    batch = devices.put(batch_host, self._batch_sharding)
    params, opt_state, loss = self._step(state.params, state.opt_state, batch)
    return ModelParallelState(params, opt_state, state.step + 1), loss

  def eval_params(self, state: ModelParallelState):
    return state.params

"""Workers that are meshes (--devices_per_worker=D): G = N / D workers, each a replica whose
gradient is the mean over its D devices' batches (collectives.worker_mean), the outer step across
workers. DiLoCo with SGD inside, H = 1, outer learning rate 1 and no outer momentum is then sync
SGD on G * D devices, on the local engine (a pmean over each worker's devices) and on the
simulated one (one replica stepping on its D shards' batches together); so is DiLoCo on workers
that are (D / M data x M model) meshes (--model_parallel=M) on the local engine."""

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from easgd_jax import collectives, partitioning, reporting, train
from easgd_jax.config import Config, ConfigError

SMALL = dict(dataset="digits", model="mlp", batch_size=8, learning_rate=0.1, steps=6)
SMALL.update(eval_every=6, checkpoint_every=0, num_devices=4, optimizer="sgd")
AS_SYNC = dict(algorithm="diloco", tau=1, outer_learning_rate=1.0, outer_momentum=0.0)


def _params(workdir, **fields):
  train.train_and_evaluate(Config(**{**SMALL, **fields}), str(workdir))
  return reporting.load_params(str(workdir / reporting.PARAMS))


@pytest.fixture(scope="module")
def sync_sgd(tmp_path_factory):
  return _params(tmp_path_factory.mktemp("sync"), algorithm="sync_sgd")


@pytest.mark.parametrize("engine", ["local", "simulated"])
def test_diloco_on_two_workers_of_two_devices_is_sync_sgd_on_four(sync_sgd, tmp_path, engine):
  extra = dict(sim_compute_ms=1.0) if engine == "simulated" else {}
  found = _params(tmp_path, engine=engine, devices_per_worker=2, **AS_SYNC, **extra)
  for name in sync_sgd:
    np.testing.assert_allclose(found[name], sync_sgd[name], rtol=2e-5, atol=1e-6, err_msg=name)
  initial = train.setup(Config(**SMALL).validate())[3]
  assert not np.allclose(found["['Dense_0']['kernel']"], initial["Dense_0"]["kernel"])  # trained


def test_diloco_on_two_workers_of_two_by_two_meshes_is_sync_sgd_on_four(sync_sgd, tmp_path):
  fields = dict(num_devices=8, devices_per_worker=4, model_parallel=2)
  found = _params(tmp_path, **fields, **AS_SYNC)
  for name in sync_sgd:
    np.testing.assert_allclose(found[name], sync_sgd[name], rtol=2e-5, atol=1e-6, err_msg=name)


def test_a_worker_that_is_a_mesh_holds_each_layer_split_over_its_model_devices():
  config = Config(
    **{**SMALL, **AS_SYNC, "num_devices": 8, "devices_per_worker": 4, "model_parallel": 2}
  )
  stepper = train.build(config.validate()).engine.stepper
  kernel = stepper.state.local["Dense_0"]["kernel"]  # [workers, 64, hidden]
  assert kernel.sharding.spec == P(collectives.AXIS, None, partitioning.MODEL)
  (shard,) = {s.data.shape for s in kernel.addressable_shards}
  assert shard == (1, kernel.shape[1], kernel.shape[2] // 2)


def test_a_mesh_worker_whose_devices_the_model_split_does_not_divide_is_refused():
  config = Config(algorithm="diloco", num_devices=8, devices_per_worker=2, model_parallel=4)
  with pytest.raises(ConfigError, match="--model_parallel=4 must divide --devices_per_worker=2"):
    train.validate(config)


def test_worker_mean_is_the_identity_without_the_inner_axis():
  tree = {"w": np.arange(3.0, dtype=np.float32)}
  assert collectives.worker_mean(tree) is tree


@pytest.mark.parametrize(
  "fields, named",
  [
    (dict(num_devices=4, devices_per_worker=3), "--devices_per_worker=3 must divide"),
    (dict(num_devices=4, devices_per_worker=2, min_workers=3), "--min_workers=3"),
    (dict(round_timeout_s=0.0), "--round_timeout_s"),
    (dict(round_timeout_s=-1.0), "--round_timeout_s"),
  ],
)
def test_bad_worker_flags_name_the_flag(fields, named):
  with pytest.raises(ConfigError, match=named):
    Config(algorithm="diloco", **fields).validate()

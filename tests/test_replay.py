"""The applied-update record replays a run: the final master rebuilt offline from
applied_updates.jsonl and the data stream alone, with the rule's own pure functions.

A locked worker/master run on threads is not reproducible (the order of arrivals is the
machine's), but its record says in which order the master applied what, and against which
version each message was computed: that, and each worker's seeded batches, fix the arithmetic.
(The unlocked pair, hogwild and hogwild_easgd, read the master while others write: their reads
mix writes and cannot be replayed.)
"""

import jax
import numpy as np
import pytest

from easgd_jax import algorithms, data, reporting, train
from easgd_jax.config import Config
from easgd_jax.engines.base import worker_seed

LOCKED = {
  "async_sgd": dict(num_devices=3),
  "async_easgd": dict(num_devices=3, tau=2),
  "async_eamsgd": dict(algorithm="async_easgd", num_devices=3, tau=2, momentum=0.9),
  "downpour": dict(num_devices=3, tau=3),
  "mdownpour": dict(algorithm="downpour", num_devices=3, tau=2, momentum=0.5),
  "async_diloco": dict(num_devices=3, tau=3, optimizer="adamw", learning_rate=2e-3),
  "easgd": dict(num_devices=3, tau=2),  # round robin: Algorithm 1's center is a master too
}


def replay(config, record):
  """The master after every update of `record`, recomputed in order; its eval weights."""
  dataset, _, loss_fn, params = train.setup(config)
  rule = algorithms.create(config, loss_fn)
  step, message_of = jax.jit(rule.worker_step), jax.jit(rule.master_apply)
  message = jax.jit(rule.worker_message) if rule.opens_round else None
  count = config.num_devices
  if rule.schedule == algorithms.ROUND_ROBIN:  # one host stream: iteration t is worker t mod G's
    stream = data.Sampler(dataset, config.seed)
    batches = [[] for _ in range(count)]
    for t in range(config.steps):
      batches[t % count].append(stream.next(config.batch_size))
  else:
    samplers = [data.Sampler(dataset, worker_seed(config.seed, j)) for j in range(count)]
    batches = [[s.next(config.batch_size) for _ in range(config.steps)] for s in samplers]
  master = rule.master_init(params)
  replies = {0: rule.eval_params(master)}  # the reply (the weights) of every version
  workers, done = [rule.worker_init(params)] * count, [0] * count
  views = [0] * count  # the version of each worker's last reply

  def silent_steps(j, until):  # worker j's steps without an exchange, up to its step `until`
    while done[j] < until:
      view = None if rule.opens_round else replies[views[j]]
      workers[j] = step(workers[j], view, batches[j][done[j]])[0]
      done[j] += 1

  for j, own, read_at, made in record:
    silent_steps(j, own)
    assert views[j] == read_at, "each message is computed against the worker's last reply"
    if rule.opens_round:  # the message, the master's update, the step against its reply
      master, replies[made] = message_of(master, message(workers[j]), j)
      workers[j] = step(workers[j], replies[made], batches[j][own])[0]
    else:
      workers[j], message, _ = step(workers[j], replies[read_at], batches[j][own])
      master, replies[made] = message_of(master, message, j)
    done[j], views[j] = own + 1, made
  return rule.eval_params(master)


@pytest.mark.parametrize("name", list(LOCKED))
def test_the_record_replays_the_final_master(tmp_path, name):
  fields = {"algorithm": name, **LOCKED[name]}
  config = train.validate(
    Config(dataset="digits", model="mlp", batch_size=16, steps=240, eval_every=240, **fields)
  )
  train.train_and_evaluate(config, str(tmp_path))
  record = reporting.read_applied(tmp_path)
  assert [made for *_, made in record] == list(range(1, len(record) + 1))
  assert len({j for j, *_ in record}) >= 2  # the workers ran side by side
  final = reporting.load_params(tmp_path / reporting.PARAMS)
  replayed = replay(config, record)
  flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(replayed)[0]}
  assert sorted(flat) == sorted(final)
  for key, value in flat.items():
    np.testing.assert_allclose(np.asarray(value), final[key], rtol=1e-6, atol=1e-7, err_msg=key)

"""--engine=simulated (easgd_jax/engines/simulated/): the same numbers as the local engine.

The deterministic algorithms give the local engine's weights; the asynchronous family's weights
are those of the local engine's own rules (or, for the Hogwild family, NumPy) replayed in the
order of the schedule the run wrote (schedule.npz). Also: a resumed run is bitwise the whole one,
the rows carry the virtual clock, and bad costs or too many workers are one line.
"""

import json
import os

import jax
import numpy as np
import pytest

from easgd_jax import algorithms, core, data, reporting, train
from easgd_jax.algorithms.base import Transfer
from easgd_jax.algorithms.sync_sgd import SyncSGD
from easgd_jax.config import Config
from easgd_jax.engines import simulated
from easgd_jax.engines.base import worker_seed
from easgd_jax.engines.local import masters
from easgd_jax.engines.simulated import events as simulated_events
from easgd_jax.errors import ConfigError, DataError

BASE = dict(
  dataset="digits",
  model="mlp",
  num_devices=4,
  batch_size=16,
  steps=60,
  eval_every=30,
  checkpoint_every=30,
)
COSTS = dict(sim_compute_ms=1.0, sim_service_us=50.0)  # given: measured ones would vary


def config_of(**changes):
  costs = COSTS if changes.get("engine") == "simulated" else {}
  return Config(**{**BASE, **costs, **changes})


def run(workdir, **changes):
  return train.train_and_evaluate(config_of(**changes), str(workdir))


def final_params(workdir):
  return reporting.load_params(workdir / reporting.PARAMS)


def keyed(tree):
  """A parameter pytree as params.npz names it."""
  return {
    jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]
  }


def assert_params_close(a, b, rtol=1e-6):
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_allclose(a[name], b[name], rtol=rtol, atol=rtol / 10, err_msg=name)


# sync_sgd and local_sgd: their phases vmapped equal the pmapped step (tests/test_phases.py).
DETERMINISTIC = {
  "sgd": {},
  "easgd": {"tau": 2},
  "sync_easgd": {"tau": 2},
  # DiLoCo magnifies the one difference between the engines, the order in which an all-reduce
  # (pmap) and the fused sum (devices.psum) add the replicas' float32 values: its
  # pseudo-gradient W-bar - mean_i W^i cancels nearly equal numbers, and the outer Nesterov
  # momentum and AdamW carry the difference on (1e-3 relative by step 60, ReLUs flipping): four
  # outer steps here, to 1e-4.
  "diloco": {"tau": 3, "steps": 12, "eval_every": 6, "checkpoint_every": 6},
}
TOLERANCE = {"diloco": 1e-4}


@pytest.mark.parametrize("algorithm", list(DETERMINISTIC))
def test_a_deterministic_algorithm_ends_with_the_local_engines_weights(tmp_path, algorithm):
  changes = dict(algorithm=algorithm, **DETERMINISTIC[algorithm])
  local = run(tmp_path / "local", **changes)
  fused = run(tmp_path / "simulated", engine="simulated", **changes)
  assert_params_close(
    final_params(tmp_path / "local"),
    final_params(tmp_path / "simulated"),
    rtol=TOLERANCE.get(algorithm, 1e-6),
  )
  # The same batches: the same training losses at every evaluation, to float32 rounding.
  np.testing.assert_allclose(
    [r["train_loss"] for r in local["history"]],
    [r["train_loss"] for r in fused["history"]],
    rtol=1e-5,
  )


def replay_inputs(workdir, config):
  """The run's schedule, its data and initial weights, and each worker's sampler."""
  schedule = dict(np.load(workdir / simulated.SCHEDULE))
  dataset, _, loss_fn, params = train.setup(config)
  samplers = [data.Sampler(dataset, worker_seed(config.seed, j)) for j in range(config.num_devices)]
  return schedule, loss_fn, params, samplers


def worker_iteration(compiled, master, w, own, worker, view, batch):
  """Worker w's iteration at its own step `own`, as the local engine's threads take it: an
  exchange that opens the step, then the step against its reply; else the step against the
  last reply, its message sent after it on an exchange step. (master, worker, its view)."""
  rule = compiled.rule
  if rule.opens_round:
    reply = None
    if rule.sends(own):
      master, reply = compiled.master_apply(master, compiled.worker_message(worker), w)
    worker, _, _ = compiled.worker_step(worker, reply, batch)
    return master, worker, view
  worker, message, _ = compiled.worker_step(worker, view, batch)
  if rule.sends(own):
    master, view = compiled.master_apply(master, message, w)
  return master, worker, view


ASYNC = {
  "async_sgd": {},
  "async_easgd": {"tau": 2},
  "downpour": {"tau": 3},
  "hogwild": {},
  "hogwild_easgd": {"tau": 2},
}


@pytest.mark.parametrize("algorithm", list(ASYNC))
def test_an_asynchronous_run_is_its_schedule_replayed(tmp_path, algorithm):
  """Through the local engine's rules (locked family) or in NumPy (Hogwild family), one
  iteration at a time in the order of schedule.npz."""
  changes = dict(algorithm=algorithm, sim_jitter=0.5, sim_stragglers=1, **ASYNC[algorithm])
  config = train.validate(config_of(**changes, engine="simulated"))  # its defaults resolved
  run(tmp_path, **changes, engine="simulated")
  schedule, loss_fn, params, samplers = replay_inputs(tmp_path, config)
  b, tau = config.batch_size, config.tau
  assert len(schedule["worker"]) == config.steps
  assert len(set(schedule["worker"].tolist())) == config.num_devices  # everyone took part
  # Each worker's own steps in order, the master's updates in order.
  for w in range(config.num_devices):
    own = schedule["own_step"][schedule["worker"] == w]
    assert own.tolist() == list(range(len(own)))
  updates = schedule["update"][schedule["exchange"]]
  assert updates.tolist() == list(range(len(updates)))
  local = algorithms.create(
    train.validate(config_of(**{k: v for k, v in changes.items() if not k.startswith("sim_")})),
    loss_fn,
  )
  compiled = masters.Compiled(local)  # the local engine's jitted rules
  if algorithm == "async_sgd":  # a worker reads W with the reply to its own update
    master = local.master_init(params)
    read = [local.eval_params(master)] * config.num_devices
    for w in schedule["worker"]:
      _, grads, _ = compiled.worker_step((), read[w], samplers[w].next(b))
      master, read[w] = compiled.master_apply(master, grads, int(w))
    replayed = local.eval_params(master)
  elif algorithm in ("async_easgd", "downpour"):  # worker_iteration: a worker's whole iteration
    master = local.master_init(params)
    states = [local.worker_init(params) for _ in range(config.num_devices)]
    views = [local.eval_params(master)] * config.num_devices
    own = [0] * config.num_devices
    for w in schedule["worker"].tolist():
      master, states[w], views[w] = worker_iteration(
        compiled, master, w, own[w], states[w], views[w], samplers[w].next(b)
      )
      own[w] += 1
    replayed = local.eval_params(master)
    ends_round = (schedule["own_step"] + (algorithm == "downpour")) % tau == 0
    assert (schedule["exchange"] == ends_round).all()
  elif algorithm == "hogwild":
    gradient = jax.jit(core.make_gradient(loss_fn))
    weights = jax.tree.map(np.asarray, params)
    read = [weights] * config.num_devices
    for w in schedule["worker"]:  # W <- W - eta * Delta W(W read); the worker reads after
      grads, _ = gradient(read[w], samplers[w].next(b))
      weights = jax.tree.map(
        lambda x, g: x - np.float32(config.learning_rate) * np.asarray(g), weights, grads
      )
      read[w] = weights
    replayed = weights
  else:  # hogwild_easgd: the center in NumPy, each worker's Eq. (1) step by its jitted rule
    alpha = np.float32(config.moving_rate)
    elastic_step = jax.jit(local.elastic_step)
    center = jax.tree.map(np.asarray, params)
    states = [(params, local.optimizer.init(params)) for _ in range(config.num_devices)]
    for w, exchange in zip(schedule["worker"], schedule["exchange"], strict=True):
      x, opt_state = states[w]
      read = center
      if exchange:  # Eq. (2) with the center read, whole, on arrival
        center = jax.tree.map(lambda c, xi: c + alpha * (np.asarray(xi) - c), center, x)
      states[w] = elastic_step(x, opt_state, read, samplers[w].next(b))[:2]
    replayed = center
  assert_params_close(keyed(replayed), final_params(tmp_path))


@pytest.mark.parametrize(
  "changes",
  [
    dict(algorithm="downpour", tau=2, sim_jitter=0.5, sim_stragglers=1, sim_shared_link=True),
    # each worker's H_w from its clock speed (the straggler's 1 of 4), kept by the checkpoint
    dict(algorithm="async_diloco", tau=4, sim_stragglers=1, dynamic_local_steps=True),
    dict(algorithm="sync_easgd", tau=2, sim_jitter=0.5, sim_node_size=2),
    dict(algorithm="easgd", tau=2),
  ],
  ids=lambda c: c["algorithm"],
)
def test_a_resumed_run_is_bitwise_the_whole_run(tmp_path, changes):
  changes = dict(engine="simulated", steps=120, **changes)
  whole = run(tmp_path / "whole", **changes)
  run(tmp_path / "resumed", **{**changes, "steps": 50})  # stops between two checkpoints
  resumed = run(tmp_path / "resumed", **changes)  # a raised --steps continues the same stream
  a, b = final_params(tmp_path / "whole"), final_params(tmp_path / "resumed")
  assert all(np.array_equal(a[k], b[k]) for k in a)
  # (train_loss differs at step 60: the first launch's last row took the losses up to 50)
  keys = ("step", "test_loss", "test_accuracy", "virtual_time_s", "communication_share")
  keys += ("link_busy_share", "bytes_sent", "peak_bandwidth_gbps")
  at = {r["step"] for r in whole["history"]}  # the resumed log has the first launch's last row
  rows = lambda s: [[r[k] for k in keys] for r in s["history"] if r["step"] in at]  # noqa: E731
  assert rows(resumed) == rows(whole)


def test_rows_and_summary_carry_the_virtual_clock(tmp_path):
  summary = run(
    tmp_path,
    algorithm="async_easgd",
    engine="simulated",
    steps=120,
    tau=2,
    target_accuracy=0.5,
    sim_latency_us=1000.0,
  )
  rows = summary["history"]
  times = [r["virtual_time_s"] for r in rows]
  assert times == sorted(times) and times[0] > 0
  for r in rows:
    assert 0 <= r["compute_share"] <= 1
    assert r["communication_share"] == pytest.approx(1 - r["compute_share"])
    assert 0 < r["master_utilization"] <= 1 and 0 < r["link_busy_share"] <= 1
    assert r["peak_bandwidth_gbps"] > 0
  sent = [r["bytes_sent"] for r in rows]
  assert sent == sorted(sent) and sent[0] > 0 and summary["sim_bytes_sent"] >= sent[-1]
  assert summary["virtual_seconds_to_target"] in times
  histogram = summary["sim_staleness_histogram"]
  schedule = np.load(tmp_path / simulated.SCHEDULE)
  assert sum(histogram.values()) == int(schedule["exchange"].sum())
  assert (tmp_path / simulated.STALENESS_PLOT).exists() and (tmp_path / reporting.PLOT).exists()
  # The costs the run used: the flags, and the bytes of one message (the MLP's weights).
  assert summary["sim_costs"]["latency_s"] == pytest.approx(1e-3)
  model_bytes = 4 * sum(np.size(v) for v in final_params(tmp_path).values())
  assert summary["sim_message_bytes"] == summary["sim_reply_bytes"] == model_bytes


def test_sixty_four_workers_run_on_one_device(tmp_path):
  summary = run(
    tmp_path,
    algorithm="sync_easgd",
    engine="simulated",
    num_devices=64,
    steps=20,
    eval_every=10,
    batch_size=4,
  )
  assert summary["final"]["step"] == 20 and summary["samples"] == 20 * 64 * 4


def test_unset_costs_are_measured_once_and_kept_for_the_relaunch(tmp_path):
  changes = dict(
    algorithm="async_sgd",
    engine="simulated",
    sim_compute_ms=None,
    sim_service_us=None,
    steps=30,
    eval_every=30,
  )
  run(tmp_path, **changes)
  saved = json.loads((tmp_path / reporting.CONFIG).read_text())
  assert saved["sim_compute_ms"] > 0 and saved["sim_service_us"] > 0
  summary = run(tmp_path, **{**changes, "steps": 60})  # resumes: the same costs, not new ones
  assert summary["sim_costs"]["compute_s"] == pytest.approx(saved["sim_compute_ms"] / 1e3)


@pytest.mark.parametrize(
  "changes, named",
  [
    (dict(sim_latency_us=0.0), "--sim_latency_us"),
    (dict(sim_bandwidth_gbps=float("nan")), "--sim_bandwidth_gbps"),
    (dict(sim_compute_ms=-1.0), "--sim_compute_ms"),
    (dict(sim_service_us=float("inf")), "--sim_service_us"),
    (dict(sim_jitter=-0.5), "--sim_jitter"),
    (dict(sim_jitter=1e6), "--sim_jitter"),  # every step's time would round to nothing
    (dict(sim_bandwidth_gbps=1e-320), "--sim_bandwidth_gbps"),  # every transfer infinite
    (dict(sim_stragglers=5), "--sim_stragglers"),
    (dict(sim_straggler_slowdown=0.5), "--sim_straggler_slowdown"),
    (dict(sim_node_size=3), "--sim_node_size=3 must divide --num_devices=4"),
    (dict(sim_node_size=0), "--sim_node_size"),
    (dict(sim_intra_node_latency_us=float("nan")), "--sim_intra_node_latency_us"),
    (dict(sim_intra_node_bandwidth_gbps=0.0), "--sim_intra_node_bandwidth_gbps"),
    (dict(sim_shared_link=True, algorithm="sync_sgd"), "--sim_shared_link"),
    (dict(sim_shared_link=True, algorithm="easgd"), "--sim_shared_link"),
    (dict(engine="local", sim_node_size=2), "--sim_node_size applies to --engine=simulated"),
    (dict(engine="ray", sim_latency_us=5.0), "--sim_latency_us applies to --engine=simulated"),
    (dict(inject_failure="0:3", algorithm="async_sgd"), "--inject_failure"),
  ],
)
def test_bad_costs_are_refused_naming_the_flag(changes, named):
  with pytest.raises(ConfigError, match=named.replace("-", r"\-")):
    train.validate(config_of(**{"engine": "simulated", **changes}))


@pytest.mark.parametrize("algorithm", ["easgd", "sync_easgd", "async_easgd"])
def test_workers_that_will_not_fit_are_refused_before_allocating(tmp_path, monkeypatch, algorithm):
  config = config_of(algorithm=algorithm, engine="simulated", num_devices=64, alpha=0.01)
  dataset, _, loss_fn, params = train.setup(config)
  one = algorithms.create(config_of(**{**config.to_dict(), "num_devices": 1}), loss_fn)
  if one.kind == algorithms.STEP_DRIVEN:  # one worker's whole state, and the master's
    whole = one.init(params)
  else:
    whole = (one.master_init(params), one.worker_init(params))
  replica = simulated._bytes(jax.tree.map(np.asarray, whole))
  # Room for 64 copies of one worker's whole state, not for the scan's three
  monkeypatch.setattr(data, "available_bytes", lambda: 64 * replica)
  with pytest.raises(DataError, match="need about .* GiB of host memory"):
    run(tmp_path, **config.to_dict())
  assert set(os.listdir(tmp_path)) <= {".lock"}  # no config.json, no checkpoint


def test_a_simulated_workdir_is_not_resumed_on_another_engine(tmp_path):
  run(tmp_path, algorithm="easgd", engine="simulated", steps=30)
  with pytest.raises(ConfigError, match="--engine=simulated"):
    run(tmp_path, algorithm="easgd", steps=60)


def test_the_clock_of_a_schedule_is_the_clock_module_s(tmp_path):
  """schedule.npz holds simulated.events.events for the run's costs, first --steps of them."""
  config = config_of(algorithm="async_sgd", engine="simulated")
  run(tmp_path, algorithm="async_sgd", engine="simulated")
  schedule = np.load(tmp_path / simulated.SCHEDULE)
  _, _, _, params = train.setup(config)
  events = simulated_events.events(
    simulated.costs(config),
    4,
    config.steps,
    simulated._bytes(params),
    seed=config.seed,
    locked=True,
  )
  np.testing.assert_array_equal(schedule["worker"], events.worker[: config.steps])
  np.testing.assert_array_equal(schedule["time"], events.time[: config.steps])


def test_a_rules_transfers_are_costed_and_a_finished_run_recosted(tmp_path, monkeypatch):
  """A made-up sync_sgd whose all-reduce of the whole model overlaps the next step: hidden on
  the default network; re-costed (no training) on a link that takes 1.5 steps for it, the link
  sets the pace: step k >= 2 starts when the transfer after step k - 2 lands, c + (k - 1) 1.5 c
  (a row's time is when the next step may start)."""
  overlapped = lambda self, step, num_bytes: (Transfer(num_bytes, 1),)  # noqa: E731
  monkeypatch.setattr(SyncSGD, "transfers", overlapped)
  summary = run(tmp_path, algorithm="sync_sgd", engine="simulated", steps=20, eval_every=10)
  c, latency, model = 1e-3, 10e-6, 4 * sum(np.size(v) for v in final_params(tmp_path).values())
  assert 6 * (latency + model / 4 / (96 * simulated.BYTES_PER_GBIT)) < c  # the ring, G = 4
  rows = summary["history"]
  assert [r["virtual_time_s"] for r in rows] == pytest.approx([10 * c, 20 * c], rel=1e-12)
  assert [r["compute_share"] for r in rows] == pytest.approx([1.0, 1.0], rel=1e-12)
  # Landed by a row: all but the last step's, each 2 (G - 1) B on the links
  assert [r["bytes_sent"] for r in rows] == pytest.approx([9 * 6 * model, 19 * 6 * model])
  peak = 2 * 3 / 4 * model / c / simulated.BYTES_PER_GBIT  # a worker's link, within one step
  assert [r["peak_bandwidth_gbps"] for r in rows] == pytest.approx([peak, peak])

  assert simulated.recost(tmp_path) == reporting.read_metrics(tmp_path)  # bit for bit
  slow = (model / 4) / (1.5 * c / 6 - latency) / simulated.BYTES_PER_GBIT
  recosted = simulated.recost(tmp_path, sim_bandwidth_gbps=slow)
  assert [r["virtual_time_s"] for r in recosted] == pytest.approx([14.5 * c, 29.5 * c], rel=1e-9)
  assert [r["test_loss"] for r in recosted] == [r["test_loss"] for r in rows]
  # Two nodes of two: a node's link carries 2 (N - 1) / N = 1 of the model's bytes a step
  nodes = simulated.recost(tmp_path, sim_node_size=2)
  assert nodes[-1]["peak_bandwidth_gbps"] == pytest.approx(model / c / simulated.BYTES_PER_GBIT)
  for changes, named in [
    (dict(learning_rate=1.0), "not --learning_rate"),
    (dict(sim_node_size=3), "--sim_node_size=3 must divide"),
  ]:
    with pytest.raises(ConfigError, match=named):
      simulated.recost(tmp_path, **changes)
  with pytest.raises(ConfigError, match=r"transfers\.npz"):
    simulated.recost(tmp_path / "nothing")

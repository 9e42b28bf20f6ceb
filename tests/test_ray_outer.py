"""The step-driven outer loops on Ray: replica actors, a reducer and a quorum per round
(easgd_jax/engines/ray/quorum.py), on the session's two-node cluster (tests/conftest.py).

Without faults a run equals the local engine's (DiLoCo on workers of two devices, and Streaming
DiLoCo's three phases); the reducer closes a round over the quorum that delivered and drops what
comes late; a worker killed inside the outer reduction stops the run at --min_workers (exit 1, a
checkpoint) or, restarted, lets it finish; run.py processes take a SIGSTOP (left out, dropped,
rejoined), a SIGKILL (restarted, rejoined) and the reducer's death (exit 3, the same command
resumes), and a node that leaves (its worker lost) and comes back (it rejoins there); DiLoCo on
digits with a worker killed mid-round lands within 0.02 of the fault-free run, over 3 seeds.
"""

import json
import os
import re
import signal
import subprocess
import time
import types

import numpy as np
import pytest
from test_ray import _launch, _wait_for, _wait_for_step, local_run, ray_run

from easgd_jax import data, reporting
from easgd_jax.config import Config
from easgd_jax.errors import WorkerFailure

from helpers import child_env, child_process

pytestmark = pytest.mark.slow
DILOCO = dict(algorithm="diloco", optimizer="adamw", learning_rate=2e-3)


EQUAL_RUNS = {
  # G = 2 workers of D = 2 devices: on Ray a mesh each (the batch split over it, GSPMD's
  # all-reduce inside), locally a pmean over the worker's devices; the outer mean at the reducer.
  "diloco, workers of 2 devices": (dict(DILOCO, num_devices=4, devices_per_worker=2, tau=2), 10),
  # G = 2 workers that are (1 data x 2 model) meshes: each layer split over a worker's devices
  # (SGD inside: the split's partial sums round apart, and AdamW's 1 / sqrt(v) would amplify it).
  "diloco, workers of 2 model-parallel devices": (
    dict(DILOCO, optimizer="sgd", learning_rate=0.1, num_devices=4, devices_per_worker=2)
    | dict(model_parallel=2, tau=2),
    10,
  ),
  # Three phases (local steps, fragment 0's sync, fragment 1's), one reduction each, overlapped.
  "streaming_diloco": (
    dict(algorithm="streaming_diloco", num_devices=2, tau=4, fragments=2, overlap_steps=1),
    10,
  ),
}


@pytest.mark.parametrize("name", sorted(EQUAL_RUNS))
def test_without_faults_ray_equals_the_local_engine(ray_cluster, tmp_path, name):
  fields, rounds = EQUAL_RUNS[name]
  fields = dict(fields, steps=20, eval_every=10)
  _, local = local_run(tmp_path / "local", **fields)
  summary, on_ray = ray_run(ray_cluster, tmp_path / "ray", **fields)
  for key in local:  # AdamW's division by sqrt(v) carries float32 rounding a little further
    np.testing.assert_allclose(on_ray[key], local[key], rtol=1e-5, atol=2e-6, err_msg=key)
  workers = fields["num_devices"] // fields.get("devices_per_worker", 1)
  assert summary["rounds"] == rounds and summary["quorum_sizes"] == {str(workers): rounds}
  assert [(r["quorum"], r["workers_alive"]) for r in summary["history"]] == [(workers,) * 2] * 2


def test_the_reducer_closes_a_round_over_the_quorum_that_delivered(ray_cluster):
  """Three members, a 1 s deadline: two push, the round closes without the third after the
  deadline with the mean of the two; the third's late push, one of an old generation and one for
  a round before the last closed are dropped; a sum over the two left closes as soon as both have
  pushed."""
  import ray

  from easgd_jax.engines.ray import cluster, replicas

  cluster.connect(Config(engine="ray", ray_address=ray_cluster.address))
  reducer = replicas.Reducer.options(num_cpus=0.25, max_concurrency=8).remote(
    {0: 0, 1: 0, 2: 0}, 1.0
  )
  try:
    started = time.monotonic()
    pushes = [
      reducer.push.remote(4, 0, j, 0, True, [np.array(x, np.float32)])
      for j, x in ((0, [1.0, 2.0]), (1, [3.0, 6.0]))
    ]
    answers = ray.get(pushes)
    assert time.monotonic() - started >= 1.0
    for status, found in answers:
      assert status == "ok"
      np.testing.assert_array_equal(ray.get(found[0])[0], [2.0, 4.0])
    late = ray.get(reducer.push.remote(4, 0, 2, 0, True, [np.zeros(2, np.float32)]))
    stale = ray.get(reducer.push.remote(5, 0, 0, 7, True, [np.zeros(2, np.float32)]))
    again = ray.get(reducer.push.remote(3, 0, 1, 0, True, [np.zeros(2, np.float32)]))  # closed
    assert late == stale == again == ("dropped", None)
    members, record, dropped = ray.get(reducer.status.remote())
    assert members == [0, 1] and dropped == [(4, 0, 2), (5, 0, 0), (3, 0, 1)]
    assert [(step, k, quorum, left_out) for step, k, quorum, left_out, *_ in record] == [
      (4, 0, [0, 1], [2])
    ]
    started = time.monotonic()
    pushes = [reducer.push.remote(5, 0, j, 0, False, [np.float32(j + 1)]) for j in (0, 1)]
    assert [float(ray.get(ray.get(p)[1][0])[0]) for p in pushes] == [3.0, 3.0]
    assert time.monotonic() - started < 1.0  # both delivered: no deadline to wait for
  finally:
    ray.kill(reducer)


def test_a_worker_killed_inside_the_outer_reduction_stops_the_run_at_min_workers(
  ray_cluster, tmp_path
):
  """--inject_failure=1:9 SIGKILLs worker 1's process inside run step 9's reduction (tau 5: rounds
  close after steps 4, 9, ...), its push delivered and the result not yet applied; the rounds
  after it have two; below --min_workers=3 the run stops at the stretch's end with a checkpoint
  (exit 1 from run.py)."""
  fields = dict(DILOCO, num_devices=3, tau=5, steps=40, eval_every=20, checkpoint_every=20)
  with pytest.raises(
    WorkerFailure,
    match=r"2 of 3 workers left \(--min_workers=3\); lost: worker 1 died at run step 10; "
    r"the run stops \(checkpoint saved at step 20\)",
  ):
    ray_run(ray_cluster, tmp_path, inject_failure="1:9", min_workers=3, **fields)
  assert os.listdir(tmp_path / "checkpoints") == ["20"]
  (row,) = reporting.read_metrics(tmp_path)
  assert (row["step"], row["workers_alive"], row["quorum"], row["quorum_min"]) == (20, 2, 2, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diloco_on_digits_with_a_worker_killed_mid_round_lands_near_the_fault_free_run(
  ray_cluster, tmp_path, seed
):
  """Worker 1 of 3 is SIGKILLed inside the round of run step 49 (--inject_failure: its process
  signals itself, at a known step), is restarted and rejoins from a live worker's state; DiLoCo
  still reaches 0.9 on digits, within 0.02 of the same run without the fault (the local engine,
  equal to Ray's)."""
  fields = dict(DILOCO, num_devices=3, tau=10, steps=300, eval_every=150, seed=seed)
  clean, _ = local_run(tmp_path / "clean", **fields)
  faulty, _ = ray_run(
    ray_cluster, tmp_path / "faulty", inject_failure="1:49", max_worker_restarts=1, **fields
  )
  assert [(f["worker"], f["step"]) for f in faulty["failed_workers"]] == [(1, 50)]
  assert faulty["quorum_sizes"].get("2", 0) >= 1 and faulty["rounds"] == 30
  accuracy = faulty["final"]["test_accuracy"]
  assert accuracy >= 0.9 and abs(accuracy - clean["final"]["test_accuracy"]) <= 0.02


def _pid(process, name, lines):
  return int(_wait_for(process, rf"ray: {name} on node 127\.0\.0\.1 pid (\d+)", lines).group(1))


def test_sigstop_sigkill_and_the_reducer_killed_then_the_same_command_resumes(
  ray_cluster, tmp_path
):
  """One run.py on three workers: worker 1 SIGSTOPped misses a round by --round_timeout_s and is
  left out; SIGCONT, its push for a closed round is dropped and it rejoins at the next boundary.
  Worker 2 SIGKILLed mid-round is restarted and rejoins. The reducer SIGKILLed: exit 3; the
  same command resumes from the last checkpoint (then SIGTERM: 143)."""
  args = _launch(ray_cluster, tmp_path, "--algorithm=diloco", "--num_devices=3", "--tau=2")
  args += ["--steps=100000", "--eval_every=500", "--checkpoint_every=500"]
  args += ["--round_timeout_s=3", "--max_worker_restarts=1"]
  lines = []
  with child_process(args, env=child_env(), stderr=subprocess.PIPE, text=True) as p:
    reducer, stopped, killed = (
      _pid(p, name, lines) for name in ("reducer", "worker 1", "worker 2")
    )
    _wait_for_step(p, 100, lines)  # a stretch's end (CHUNK), not an evaluation's: mid-rounds
    os.kill(stopped, signal.SIGSTOP)
    _wait_for(p, r"ray: worker 1 left out at run step \d+", lines)
    os.kill(stopped, signal.SIGCONT)
    _wait_for(p, r"ray: worker 1's push for run step \d+ came after its round closed", lines)
    _wait_for(p, r"ray: worker 1 joined at run step \d+ from worker \d's state", lines)
    _wait_for_step(p, 600, lines)  # past a row and a checkpoint with rounds without worker 1
    os.kill(killed, signal.SIGKILL)
    _wait_for(p, r"ray: worker 2 died at run step \d+", lines)
    _wait_for(p, r"ray: worker 2 joined at run step", lines)
    os.kill(reducer, signal.SIGKILL)
    lines += p.stderr.readlines()
    assert p.wait(timeout=60) == 3, "".join(lines)[-3000:]
  text = "".join(lines)
  errors = [line for line in lines if line.startswith("error:")]
  assert len(errors) == 1 and "the reducer died" in errors[0]
  history = re.search(r"ray: (worker 1 left out at run step .*)", text)
  assert history and re.search(
    r"worker 1 rejoined at run step \d+; worker 2 died at run step \d+; worker 2 rejoined", text
  ), text[-3000:]
  rows = reporting.read_metrics(tmp_path)
  # Rounds closed over 2 members between rows; whether a row falls while a worker is out is a
  # race here (the node test, whose worker stays out, asserts `workers_alive`).
  assert min(r["quorum_min"] for r in rows) == 2
  saved = max(int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit())

  lines = []
  with child_process(args, env=child_env(), stderr=subprocess.PIPE, text=True) as p:
    _wait_for(p, f"resuming from the checkpoint at step {saved}", lines)
    _wait_for_step(p, saved + 50, lines)
    p.send_signal(signal.SIGTERM)
    lines += p.stderr.readlines()
    assert p.wait(timeout=60) == 143, "".join(lines)[-3000:]
  config = json.loads((tmp_path / reporting.CONFIG).read_text())
  assert config["round_timeout_s"] == 3 and config["engine"] == "ray"


def test_a_worker_stopped_at_an_evaluation_is_left_out_alone_and_the_run_goes_on(
  ray_cluster, tmp_path
):
  """Worker 1 SIGSTOPped as the driver asks every member for its evaluation point (step 100):
  it alone is left out (it did not answer), the others' answers are taken and the run goes on;
  once SIGCONTed it rejoins. (Fetching every answer while waiting left all three out.)"""
  args = _launch(ray_cluster, tmp_path, "--algorithm=diloco", "--num_devices=3", "--tau=2")
  args += ["--steps=100000", "--eval_every=100", "--round_timeout_s=3"]
  lines = []
  with child_process(args, env=child_env(), stderr=subprocess.PIPE, text=True) as p:
    stopped = _pid(p, "worker 1", lines)
    _wait_for_step(p, 100, lines)
    os.kill(stopped, signal.SIGSTOP)
    _wait_for(p, r"ray: worker 1 left out at run step \d+", lines)
    _wait_for_step(p, 400, lines)
    os.kill(stopped, signal.SIGCONT)
    _wait_for(p, r"ray: worker 1 joined at run step \d+", lines)
    p.send_signal(signal.SIGTERM)
    lines += p.stderr.readlines()
    assert p.wait(timeout=60) == 143, "".join(lines)[-3000:]
  left_out = [line for line in lines if " left out at run step" in line]
  assert left_out and all("worker 1 " in line for line in left_out), left_out


def test_a_node_that_leaves_takes_its_worker_which_rejoins_when_a_node_comes_back(
  ray_cluster, tmp_path
):
  """A third node joins and gets one of three workers (spread). With every free CPU of the
  cluster taken (ballast actors), the node leaves: its worker is lost and its restart waits; a
  node comes back, the restarted worker starts there and rejoins at a round boundary."""
  import ray

  from easgd_jax.engines.ray import cluster

  node = ray_cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
  ray_cluster.wait_for_nodes()
  back, ballast = None, []
  args = _launch(ray_cluster, tmp_path, "--algorithm=diloco", "--num_devices=3", "--tau=2")
  args += ["--steps=100000", "--eval_every=100", "--max_worker_restarts=1"]
  lines = []
  try:
    with child_process(args, env=child_env(), stderr=subprocess.PIPE, text=True) as p:
      places = [_wait_for(p, rf"ray: worker {j} on (.*)", lines).group(1) for j in range(3)]
      on_it = [j for j, place in enumerate(places) if node.node_id in place]
      assert len(on_it) == 1, places
      _wait_for_step(p, 100, lines)
      cluster.connect(Config(engine="ray", ray_address=ray_cluster.address))
      ballast = _fill_free_cpus(ray)
      ray_cluster.remove_node(node, allow_graceful=False)
      _wait_for(p, rf"ray: worker {on_it[0]} died at run step \d+", lines, timeout=300)
      _wait_for(p, rf"ray: worker {on_it[0]} restarted", lines)
      _wait_for_step(p, int(re.findall(r"progress: step (\d+)", "".join(lines))[-1]) + 50, lines)
      assert f"worker {on_it[0]} joined" not in "".join(lines)  # nowhere to start yet
      back = ray_cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
      _wait_for(p, rf"ray: worker {on_it[0]} joined at run step \d+", lines, timeout=300)
      p.send_signal(signal.SIGTERM)
      lines += p.stderr.readlines()
      assert p.wait(timeout=60) == 143, "".join(lines)[-3000:]
  finally:
    for actor in ballast:
      ray.kill(actor)
    for extra in (node, back):
      if extra is not None and extra in ray_cluster.worker_nodes:
        ray_cluster.remove_node(extra, allow_graceful=False)
    ray_cluster.wait_for_nodes(timeout=120)
  rows = reporting.read_metrics(tmp_path)
  assert min(r["workers_alive"] for r in rows) == 2


def test_a_new_actor_lost_before_it_started_is_placed_again_without_spending_a_restart():
  """A restarted worker's actor whose node dies before it starts (Ray: the actor died, not by an
  error in its __init__) is placed again, PLACEMENTS times in a row, without spending one of
  --max_worker_restarts; one whose __init__ raised spends one."""
  import ray

  from easgd_jax.engines.ray import quorum

  class Actor:
    where = types.SimpleNamespace(remote=lambda: "where")

  engine = quorum.QuorumEngine.__new__(quorum.QuorumEngine)
  engine.config = Config(max_worker_restarts=1)
  engine.restarts, engine.placements, engine.generation = [0], [0], [1]
  engine.joining, engine.members, engine._replica = {}, set(), lambda *_, **__: Actor()
  lost = ray.exceptions.ActorDiedError()  # its node died under it: never started
  for tries in range(quorum.PLACEMENTS):
    engine._restart(0, lost)
    assert (engine.placements, engine.restarts, list(engine.joining)) == ([tries + 1], [0], [0])
  engine._restart(0, lost)  # placed too often: a restart spent
  assert (engine.placements, engine.restarts) == ([quorum.PLACEMENTS], [1])
  engine.restarts, engine.placements, engine.joining = [0], [0], {}
  raised = ray.exceptions.RayActorError(actor_init_failed=True)
  engine._restart(0, raised)
  assert (engine.placements, engine.restarts, list(engine.joining)) == ([0], [1], [0])
  engine._restart(0, raised)  # no restart left: it stays out
  assert engine.restarts == [1]


def _fill_free_cpus(ray, cpus=0.25):
  """Idle actors on every free quarter CPU of the cluster, so that nothing new can start."""

  @ray.remote(num_cpus=cpus)
  class Ballast:
    def ready(self):
      return True

  count = int(ray.available_resources().get("CPU", 0) / cpus)
  actors = [Ballast.remote() for _ in range(count)]
  ray.get([a.ready.remote() for a in actors], timeout=120)
  return actors


def test_a_rejoining_worker_draws_a_fresh_stream_seeded_by_seed_shard_and_step():
  """Replica.join reseeds its shards' generators from (seed, shard, the run step it joins at):
  the same three give the same batches, any other gives others, and none replays the old one."""
  dataset = data.load(Config(dataset="digits"))

  def drawn(step=None, seed=0, shard=1):
    sampler = data.ShardedSampler(dataset, 3, [shard], seed)
    old = sampler.indices(8)
    if step is not None:
      sampler.fresh(step)
    return old, sampler.indices(8)

  old, new = drawn(40)
  assert np.array_equal(new, drawn(40)[1]) and not np.array_equal(new, drawn()[1])
  for other in (drawn(41), drawn(40, seed=1), drawn(40, shard=2)):
    assert not np.array_equal(new, other[1])
  assert not np.array_equal(new, old)

"""The simulated cluster's network (easgd_jax/engines/simulated/clock.py, events.py) against
hand-derived makespans: transfers that overlap compute, links shared first in first out, a
two-level topology's all-reduce, payload bytes, the peak bandwidth, a master never above 100 %.

Every case: compute c = 10 ms a step, latency 0.1 ms, 1 GB/s between nodes, so one all-reduce
among G = 2 of B bytes takes 2 (0.1 ms + B / 2 / 1 GB/s) = 0.2 ms + B / 1 GB/s.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from easgd_jax.algorithms.base import Transfer, WorkerMasterRule
from easgd_jax.config import Config
from easgd_jax.engines import simulated
from easgd_jax.engines.simulated.clock import BYTES_PER_GBIT, Costs, round_robin, synchronous
from easgd_jax.engines.simulated.events import events, metrics

C = 0.01  # compute, one step
HIDDEN, LONG = 8e6, 14.8e6  # all-reduces (G = 2) of 8.2 ms and 15 ms


def costs(**changes):
  base = dict(compute_s=C, latency_s=1e-4, bandwidth_bytes_s=1e9, service_s=1e-4)
  return Costs(**{**base, **changes})


@pytest.mark.parametrize(
  "num_bytes, overlap, step_end",
  [
    (HIDDEN, 1, [0.01, 0.02, 0.03]),  # lands at 18.2 ms, while step 1 computes: hidden whole
    (LONG, 1, [0.01, 0.025, 0.035]),  # lands at 25 ms: step 2 waits 5 ms of its 15
    (LONG, 0, [0.025, 0.035, 0.045]),  # blocking: step 1 waits all 15 ms
    (HIDDEN, 0, [0.0182, 0.0282, 0.0382]),
  ],
)
def test_a_transfer_overlapping_a_step_is_hidden_whole_in_part_or_not_at_all(
  num_bytes, overlap, step_end
):
  timing = synchronous(costs(), 2, [(Transfer(num_bytes, overlap),), (), ()])
  seconds = 2e-4 + num_bytes / 1e9
  assert timing.step_end == pytest.approx(step_end, rel=1e-12)
  clock = timing.at(3)
  # Only the waiting is communication: 3 steps of 2 workers over 2 workers' time
  assert clock["compute_share"] == pytest.approx(0.03 / step_end[-1], rel=1e-12)
  assert clock["communication_share"] == pytest.approx(1 - 0.03 / step_end[-1], abs=1e-12)
  assert clock["link_busy_share"] == pytest.approx(seconds / step_end[-1], rel=1e-12)
  assert clock["bytes_sent"] == pytest.approx(2 * num_bytes)  # 2 (G - 1) B: every link
  # Each worker's link moves B (2 messages of B / 2) within one step's compute
  assert clock["peak_bandwidth_gbps"] == pytest.approx(num_bytes / C / BYTES_PER_GBIT)


def test_transfers_in_flight_queue_on_the_link_first_in_first_out():
  # After step 0: 15 ms overlapping 2 steps (due before step 3); after step 1: 15 ms blocking.
  # The second waits for the link until 25 ms, lands at 40 ms (at 35 ms if they ran side by
  # side): step 2 runs 40-50 ms, step 3 (the first landed long ago) 50-60 ms.
  transfers = [(Transfer(LONG, 2),), (Transfer(LONG, 0),), (), ()]
  timing = synchronous(costs(), 2, transfers)
  assert timing.step_end == pytest.approx([0.01, 0.04, 0.05, 0.06], rel=1e-12)
  assert timing.at(4)["link_busy_share"] == pytest.approx(0.03 / 0.06, rel=1e-12)
  assert timing.at(4)["bytes_sent"] == pytest.approx(4 * LONG)
  # Step 2 must carry half the first (spread over its two steps) and the whole second
  assert timing.at(2)["peak_bandwidth_gbps"] == pytest.approx(1.5 * LONG / C / BYTES_PER_GBIT)
  assert timing.at(1)["peak_bandwidth_gbps"] == pytest.approx(0.5 * LONG / C / BYTES_PER_GBIT)


def test_a_transfer_still_on_its_way_counts_its_time_so_far_and_its_bytes_once_landed():
  timing = synchronous(costs(), 2, [(Transfer(LONG, 2),), (), ()])  # 10-25 ms
  assert timing.step_end == pytest.approx([0.01, 0.02, 0.03], rel=1e-12)
  at_2, at_3 = timing.at(2), timing.at(3)
  assert at_2["link_busy_share"] == pytest.approx(0.01 / 0.02, rel=1e-12)  # 10 of its 15 ms
  assert at_2["bytes_sent"] == 0.0 and at_3["bytes_sent"] == pytest.approx(2 * LONG)
  assert at_3["link_busy_share"] == pytest.approx(0.015 / 0.03, rel=1e-12)
  assert at_2["compute_share"] == 1.0 and at_3["compute_share"] == 1.0


def test_an_all_reduce_is_hierarchical_inside_nodes_and_a_ring_across_them():
  B, workers = 8e6, 8
  fast = dict(intra_latency_s=1e-6, intra_bandwidth_bytes_s=1e11)
  inside = 2 * 3 * (1e-6 + B / 4 / 1e11)  # reduce-scatter and all-gather among 4
  across = 2 * 1 * (1e-4 + B / 2 / 1e9)  # a ring of 2 nodes, each link carrying 1/2
  two_nodes = costs(node_size=4, **fast)
  assert two_nodes.all_reduce_s(B, workers) == pytest.approx(inside + across, rel=1e-12)
  assert two_nodes.intra_all_reduce_s(B, 4) == pytest.approx(inside, rel=1e-12)
  flat = 2 * 7 * (1e-4 + B / 8 / 1e9)
  assert costs(**fast).all_reduce_s(B, workers) == pytest.approx(flat, rel=1e-12)
  one_node = 2 * 7 * (1e-6 + B / 8 / 1e11)
  assert costs(node_size=8, **fast).all_reduce_s(B, workers) == pytest.approx(one_node)

  blocking = [(Transfer(B),)] * 3
  timing = synchronous(two_nodes, workers, blocking)
  clock = timing.at(3)
  assert clock["virtual_time_s"] == pytest.approx(3 * (C + inside + across), rel=1e-12)
  assert clock["bytes_sent"] == pytest.approx(3 * 2 * 7 * B)
  # A node's link between nodes moves 2 (N - 1) / N of B; inside one node, nothing
  assert clock["peak_bandwidth_gbps"] == pytest.approx(B / C / BYTES_PER_GBIT)
  one = synchronous(costs(node_size=8, **fast), workers, blocking).at(3)
  assert one["peak_bandwidth_gbps"] == 0.0
  with pytest.raises(ValueError, match="node_size"):
    costs(node_size=3).all_reduce_s(B, workers)


def test_a_worker_of_several_devices_all_reduces_each_gradient_on_its_nodes_links():
  B, fast = 8e6, dict(intra_latency_s=1e-6, intra_bandwidth_bytes_s=1e11)
  inside = 2 * 3 * (1e-6 + B / 4 / 1e11)  # a ring among the worker's 4 devices, every step
  across = 2 * 1 * (1e-4 + B / 2 / 1e9)  # then the outer ring of the G = 2 workers
  inner_s = costs(**fast).intra_all_reduce_s(B, 4)
  assert inner_s == pytest.approx(inside, rel=1e-12)
  timing = synchronous(costs(**fast), 2, [(Transfer(B),), (), ()], inner_s=inner_s)
  steps = [C + inside + across, C + inside, C + inside]
  assert timing.step_end == pytest.approx(np.cumsum(steps), rel=1e-12)
  clock = timing.at(3)
  assert clock["compute_share"] == pytest.approx(3 * C / sum(steps), rel=1e-12)
  assert clock["bytes_sent"] == pytest.approx(2 * B)  # the outer ring's only: off the node
  assert costs(**fast).intra_all_reduce_s(B, 1) == 0.0  # a worker of one device: nothing


def test_the_simulated_engine_costs_a_mesh_workers_inner_all_reduce(tmp_path):
  from easgd_jax import reporting, train

  fields = dict(dataset="digits", model="mlp", algorithm="local_sgd", tau=4, steps=8)
  fields.update(num_devices=4, engine="simulated", sim_compute_ms=1.0, sim_service_us=1.0)
  fields.update(eval_every=8, checkpoint_every=0, batch_size=8)
  fields.update(sim_latency_us=100.0, sim_bandwidth_gbps=8.0)  # 1 GB/s between nodes
  fields.update(sim_intra_node_latency_us=2.0, sim_intra_node_bandwidth_gbps=2400.0)
  flat = train.train_and_evaluate(Config(**fields), str(tmp_path / "flat"))
  meshes = train.train_and_evaluate(Config(**fields, devices_per_worker=2), str(tmp_path / "m"))
  # G = 2 workers of 2 devices against 4 of 1: the outer all-reduces differ (2 workers, not 4),
  # and every step adds the ring of 2 on the node's links (2 us, 300 GB/s).
  num_bytes = meshes["sim_message_bytes"]
  inner = 2 * 1 * (2e-6 + num_bytes / 2 / 300e9)
  assert meshes["sim_inner_all_reduce_s"] == pytest.approx(inner, rel=1e-9)
  assert flat["sim_inner_all_reduce_s"] == 0.0
  outer = lambda g: 2 * (g - 1) * (1e-4 + num_bytes / g / 1e9)  # noqa: E731
  rows = {name: reporting.read_metrics(str(tmp_path / name))[-1] for name in ("flat", "m")}
  two_rounds = lambda g, inner_s: 8 * (1e-3 + inner_s) + 2 * outer(g)  # noqa: E731
  assert rows["flat"]["virtual_time_s"] == pytest.approx(two_rounds(4, 0.0), rel=1e-9)
  assert rows["m"]["virtual_time_s"] == pytest.approx(two_rounds(2, inner), rel=1e-9)


def test_parameter_server_messages_queue_on_a_shared_link_or_their_nodes():
  B, s = 1e6, 1e-4
  t = 1e-4 + B / 1e9  # 1.1 ms each way, longer than the master's 0.1 ms
  own = events(costs(), 2, 4, B)
  assert own.time[:2] == pytest.approx([C + t, C + t + s], rel=1e-12)  # the master queues
  # One link: worker 1's message waits behind worker 0's; replies alike, on the way out
  shared = events(costs(shared_link=True), 2, 4, B)
  expected = [C + t, C + 2 * t, 2 * C + 3 * t + s, 2 * C + 4 * t + s]
  assert shared.time == pytest.approx(expected, rel=1e-12)
  assert shared.worker.tolist() == [0, 1, 0, 1]
  clock = metrics(shared, 2)
  assert clock["link_busy_share"] == pytest.approx(2 * 2 * t / (C + 2 * t), rel=1e-12)
  assert clock["bytes_sent"] == 2 * (B + B)
  assert clock["peak_bandwidth_gbps"] == pytest.approx(2 * B / C / BYTES_PER_GBIT)  # 2 share
  # Two nodes of two: each node's pair queues on its link, the nodes side by side
  nodes = events(costs(node_size=2), 4, 4, B)
  assert nodes.time == pytest.approx([C + t, C + t + s, C + 2 * t, C + 2 * t + s], rel=1e-12)
  assert nodes.worker.tolist() == [0, 2, 1, 3]
  assert metrics(own, 2)["peak_bandwidth_gbps"] == pytest.approx(B / C / BYTES_PER_GBIT)


def test_a_message_and_its_reply_cost_their_own_bytes():
  up, down = 2e6, 6e6
  t_up, t_down = 1e-4 + up / 1e9, 1e-4 + down / 1e9
  found = events(costs(), 1, 3, up, reply_bytes=down)
  period = C + t_up + 1e-4 + t_down  # step, message, update, reply
  assert found.time == pytest.approx([r * period + C + t_up for r in range(3)], rel=1e-12)
  clock = metrics(found, 3)
  assert clock["bytes_sent"] == 3 * (up + down)
  assert clock["peak_bandwidth_gbps"] == pytest.approx(down / C / BYTES_PER_GBIT)
  # Algorithm 1: every own step of 2 workers opens with the center's trip and x^j's back
  timing = round_robin(costs(), 2, 4, up, tau=1, reply_bytes=down)
  assert timing.at(4)["virtual_time_s"] == pytest.approx(4 * period, rel=1e-12)
  assert timing.at(4)["bytes_sent"] == 4 * (up + down)
  assert timing.at(4)["peak_bandwidth_gbps"] == pytest.approx(down / C / BYTES_PER_GBIT)


def test_a_locked_master_is_never_more_than_fully_busy():
  # Four workers and a 1 s update: after the first arrival (c + t) the master never idles, the
  # n-th update starts at c + t + (n - 1) s, and that is the row's time: n - 1 updates done.
  s = 1.0
  c = costs(service_s=s, latency_s=1e-6)
  t = 1e-6 + 1000 / 1e9
  found = events(c, 4, 40, 1000)
  for n in range(1, 41):
    now = C + t + (n - 1) * s
    assert found.time[n - 1] == pytest.approx(now, rel=1e-12)
    utilization = metrics(found, n)["master_utilization"]
    assert utilization == pytest.approx((n - 1) * s / now, rel=1e-12) and utilization <= 1.0
  jittered = events(costs(service_s=0.02, jitter=0.5), 6, 500, 1000, tau=2, seed=3)
  assert max(metrics(jittered, n)["master_utilization"] for n in range(1, 501)) <= 1.0


class HalfPrecisionMessages(WorkerMasterRule):
  """A made-up rule whose worker sends its gradient in float16: the payload, not the model."""

  name = "half_precision_messages"
  additive = True

  def master_init(self, params):
    return params

  def worker_init(self, params):
    return ()

  def worker_step(self, worker, view, batch):
    message = jax.tree.map(lambda w: (w * jnp.mean(batch["image"])).astype(jnp.float16), view)
    return worker, message, jnp.float32(0.0)

  def increment(self, weights, message):
    return jax.tree.map(lambda m: m.astype(jnp.float32), message)


class OpeningPoints(HalfPrecisionMessages):
  opens_round = True

  def worker_init(self, params):
    return {"local": params, "step": jnp.zeros([], jnp.int32)}

  def worker_message(self, worker):
    return worker["local"]  # x^i alone, not the worker's whole state


def test_message_bytes_come_from_the_rules_own_pytrees():
  params = {"w": np.zeros((10, 3), np.float32), "b": np.zeros(3, np.float32)}
  batch = {"image": np.ones((4, 10), np.float32), "label": np.zeros(4, np.int32)}
  assert simulated.payload_bytes(HalfPrecisionMessages(), params, batch) == (2 * 33, 4 * 33)
  assert simulated.payload_bytes(OpeningPoints(), params, batch) == (4 * 33, 4 * 33)


def test_the_flags_reach_the_costs():
  flags = dict(sim_node_size=2, sim_shared_link=True, sim_intra_node_latency_us=3.0)
  measured = dict(sim_compute_ms=1.0, sim_service_us=5.0)
  config = Config(engine="simulated", sim_intra_node_bandwidth_gbps=800.0, **flags, **measured)
  found = simulated.costs(config)
  assert (found.node_size, found.shared_link) == (2, True)
  assert found.intra_latency_s == pytest.approx(3e-6) and found.intra_bandwidth_bytes_s == 1e11

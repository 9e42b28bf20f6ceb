"""Chaos: DiLoCo on Ray while a random worker is SIGKILLed every so often, against the same run
without faults.

  python experiments/chaos.py                           # digits, G = 4, 20000 steps, MTBF 10 s
  python experiments/chaos.py --mtbf_s=5 --steps=50000  # harsher and longer
  python experiments/chaos.py --ray_address=auto        # a real cluster: kills this host's
                                                        # workers only

Starts a two-node Ray cluster on loopback (ray.cluster_utils.Cluster) unless --ray_address is
given, then runs `run.py --engine=ray --algorithm=diloco` twice on it: once untouched, once while
this script SIGKILLs the process of a worker drawn at random, the gaps between kills drawn from
an exponential law of mean --mtbf_s (seeded by --seed), sparing the last live worker (a joiner
takes a live worker's state; with none left the run would stop). Workers are restarted
(--max_worker_restarts) and rejoin at the next round boundary from a live worker's state; a
worker's process is found from the run's log ("ray: worker J on node H pid P"). Prints one
markdown table: kills, the rounds' quorum sizes, the final test loss and accuracy of both runs,
their difference, and the times from a loss to the next closed round and to the rejoin. Every Ray
process it started is stopped in a `finally`.
"""

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = re.compile(r"ray: worker (\d+) on node (\S+) pid (\d+)")
HERE = {"127.0.0.1", socket.gethostbyname(socket.gethostname())}


def parse():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--mtbf_s", type=float, default=10.0, help="mean seconds between kills")
  parser.add_argument("--steps", type=int, default=20000)
  parser.add_argument("--workers", type=int, default=4, help="G")
  parser.add_argument("--tau", type=int, default=20, help="H, inner steps per round")
  parser.add_argument("--dataset", default="digits")
  parser.add_argument("--model", default="mlp")
  parser.add_argument("--seed", type=int, default=0, help="the run's seed and the kills'")
  parser.add_argument("--round_timeout_s", type=float, default=10.0)
  parser.add_argument("--ray_address", default=None, help="a running cluster (default: start one)")
  parser.add_argument("--workdir", default=None, help="where both runs go (default: a temp dir)")
  return parser.parse_args()


def command(args, workdir, address):
  return [
    sys.executable,
    os.path.join(REPO, "run.py"),
    "--engine=ray",
    f"--ray_address={address}",
    "--algorithm=diloco",
    f"--dataset={args.dataset}",
    f"--model={args.model}",
    f"--num_devices={args.workers}",
    f"--tau={args.tau}",
    f"--steps={args.steps}",
    f"--eval_every={args.steps // 4}",
    f"--seed={args.seed}",
    f"--round_timeout_s={args.round_timeout_s}",
    "--max_worker_restarts=1000",
    "--progress_every_s=5",
    f"--workdir={workdir}",
  ]


def run(args, workdir, address, mtbf_s=None):
  """One run.py; with `mtbf_s`, a thread SIGKILLs a random live worker at exponential gaps.
  Returns (its summary, the kills: (seconds after the first kill, worker))."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  process = subprocess.Popen(
    command(args, workdir, address), stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
  )
  pids, kills, done, lines = {}, [], threading.Event(), []
  rng = np.random.default_rng(args.seed)

  def chaos():
    started = None
    while not done.wait(rng.exponential(mtbf_s)):
      alive = {j: pid for j, pid in pids.items() if _alive(pid)}
      if len(alive) < 2:  # the last live worker holds the run's state: spared
        continue
      j = int(rng.choice(sorted(alive)))
      started = started or time.monotonic()
      del pids[j]  # its replacement's pid comes with its "ray: worker J on" line
      os.kill(alive[j], signal.SIGKILL)
      kills.append((round(time.monotonic() - started, 1), j))
      print(f"chaos: SIGKILL worker {j} (pid {alive[j]})", file=sys.stderr, flush=True)

  killer = threading.Thread(target=chaos, daemon=True)
  try:
    for line in process.stderr:
      lines.append(line)
      found = WORKER.search(line)
      if found and found[2] in HERE:  # a pid on another host is not ours to signal
        pids[int(found[1])] = int(found[3])
      if mtbf_s and "progress:" in line and not killer.is_alive() and not done.is_set():
        killer.start()  # once the workers have compiled and run: kills, not failed starts
      if re.search(r"step \d+/(\d+) \(100%\)", line):
        done.set()  # the last stretch: no kill in the checkpoint and the shutdown
      if re.search(r"progress:|chaos|joined|died|restarted|stays out", line):
        print(line.rstrip()[:160], file=sys.stderr, flush=True)
    code = process.wait()
  finally:
    done.set()
    if process.poll() is None:
      process.kill()
      process.wait()
  if code != 0:
    raise SystemExit(f"run.py exited {code}:\n{''.join(lines)[-3000:]}")
  with open(os.path.join(workdir, "summary.json")) as f:
    return json.load(f), kills


def _alive(pid):
  try:
    os.kill(pid, 0)
  except OSError:
    return False
  return True


def main():
  args = parse()
  os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # loopback addresses only
  cluster, workdir = None, args.workdir or tempfile.mkdtemp(prefix="chaos_")
  try:
    address = args.ray_address
    if address is None:
      from ray.cluster_utils import Cluster

      node = dict(num_cpus=2, object_store_memory=200 * 2**20)
      cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
      cluster.add_node(**node)
      cluster.wait_for_nodes()
      address = cluster.address
    clean, _ = run(args, os.path.join(workdir, "clean"), address)
    faulty, kills = run(args, os.path.join(workdir, "chaos"), address, args.mtbf_s)
  finally:
    if cluster is not None:
      cluster.shutdown()
  report(args, clean, faulty, kills)


def report(args, clean, faulty, kills):
  a, b = clean["final"], faulty["final"]
  print(
    f"\nDiLoCo on {args.dataset} ({args.model}), G = {args.workers}, H = {args.tau}, "
    f"{args.steps} steps, seed {args.seed}; a worker SIGKILLed every {args.mtbf_s:g} s on average"
  )
  print("| run | kills | quorum sizes (rounds) | test loss | test accuracy |")
  print("| --- | --- | --- | --- | --- |")
  for name, summary, count in (("fault-free", clean, 0), ("chaos", faulty, len(kills))):
    f = summary["final"]
    sizes = ", ".join(f"{k}: {v}" for k, v in summary.get("quorum_sizes", {}).items())
    print(f"| {name} | {count} | {sizes} | {f['test_loss']:.4f} | {f['test_accuracy']:.4f} |")
  print(
    f"\ndifference: test loss {b['test_loss'] - a['test_loss']:+.4f}, test accuracy "
    f"{b['test_accuracy'] - a['test_accuracy']:+.4f}; loss to the next closed round (s): "
    f"{faulty.get('lost_to_next_round_s')}; loss to rejoined (s): "
    f"{faulty.get('lost_to_rejoined_s')}; kills (s, worker): {kills}"
  )


if __name__ == "__main__":
  main()

"""Eight emulated CPU devices for every test; must run before jax is imported anywhere.

Also: one persistent compilation cache for the session, the order the test files run in, and
the fixtures every file shares (what they share otherwise is in tests/helpers.py).
"""

import os
import tempfile

os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The tests build the same small programs again and again: every train_and_evaluate, study arm,
# notebook kernel and run.py launch jits its steps afresh. A persistent compilation cache shared
# by this process and every process it starts (the environment is inherited) compiles each
# program once per session; the results are bit-for-bit those of a fresh compile. It starts
# empty, so no session depends on an earlier one. pytest-xdist's controller makes it and its
# workers, started with the controller's environment, take that one (SHARED_CACHE says which):
# a program both workers build compiles once.
SHARED_CACHE = "EASGD_JAX_TESTS_COMPILATION_CACHE"
if not (os.environ.get("PYTEST_XDIST_WORKER") and os.path.isdir(os.environ.get(SHARED_CACHE, ""))):
  COMPILATION_CACHE = tempfile.TemporaryDirectory(prefix="easgd_jax_tests_compilation_cache_")
  os.environ[SHARED_CACHE] = COMPILATION_CACHE.name
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ[SHARED_CACHE]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"  # the tiny programs too

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_compilation_cache_dir", os.environ[SHARED_CACHE])  # if jax came in earlier
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

# The test files that take longest, longest first (their test-seconds in an idle 2-core run of
# the whole suite, 2026-12-05: test_ray 345, test_ray_outer 298, test_checkpoints 267, test_lm
# 124, then 94 down to 28). pytest-xdist's --dist loadfile with --no-loadscope-reorder
# (pyproject.toml) hands whole files to the two workers in this order, each worker taking the
# next when it has two tests left: the long files start early and the short ones fill the end.
# test_ray_outer comes after test_lm so that the two Ray files do not run side by side (each
# worker has a Ray cluster of its own, and their fault tests wait on timings).
LONGEST_FIRST = (
  "test_ray.py",
  "test_checkpoints.py",
  "test_lm.py",
  "test_ray_outer.py",
  "test_defaults.py",
  "test_study.py",
  "test_workdir.py",
  "test_simulated.py",
  "test_async.py",
  "test_sync.py",
  "test_multiprocess.py",
  "test_notebooks.py",
  "test_model_parallel.py",
  "test_trainer.py",
  "test_configs.py",
  "test_golden.py",
  "test_bad_input.py",
  "test_data_models.py",
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in order


@pytest.fixture(scope="module")
def problem(request):
  """(loss_fn, initial weights) of helpers.tiny_problem, seeded by the module's PROBLEM_SEED."""
  import helpers

  return helpers.tiny_problem(getattr(request.module, "PROBLEM_SEED", 3))


@pytest.fixture(scope="session")
def cpu_devices():
  devices = jax.devices()
  assert len(devices) >= 8, "tests expect 8 emulated devices (see tests/conftest.py)"
  return devices


@pytest.fixture(scope="session")
def ray_cluster():
  """A two-node Ray cluster on this machine, loopback only, for the session; its address.

  Started once, on first use: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 goes into the environment
  before Ray is imported, so every node takes 127.0.0.1 as its address. This test process
  joins it (the engine's `ray.init`), and so do the run.py processes the tests start, with
  --ray_address. On the way out every Ray process it started must be gone.
  """
  import psutil

  os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
  import ray
  from ray.cluster_utils import Cluster

  node = dict(num_cpus=2, object_store_memory=80 * 2**20, include_dashboard=False)
  # A node the tests remove is declared dead after 3 failed health checks 1 s apart (Ray's
  # defaults: 5, 3 s apart), so the tests that wait for it wait ~3 s, not ~15; a live raylet
  # still has Ray's 10 s to answer each check, however busy the machine.
  health = dict(health_check_period_ms=1000, health_check_failure_threshold=3)
  cluster = Cluster(initialize_head=True, head_node_args={**node, "_system_config": health})
  try:
    cluster.add_node(**{k: v for k, v in node.items() if k != "include_dashboard"})
    cluster.wait_for_nodes()
    yield cluster
  finally:
    started = psutil.Process().children(recursive=True)
    ray.shutdown()
    cluster.shutdown()
    _, alive = psutil.wait_procs([p for p in started if _is_ray(p)], timeout=20)
    for process in alive:
      process.kill()
    assert not alive, f"Ray processes outlived the test session: {[p.pid for p in alive]}"


def _is_ray(process):
  import psutil

  try:
    return any(
      "ray" in part or "gcs_server" in part or "raylet" in part for part in process.cmdline()
    )
  except psutil.Error:
    return False

"""Joining a Ray cluster, or starting a private one on loopback, for `--engine=ray`.

Only --ray_address joins a cluster. Without it the run starts its own (`address="local"`):
Ray's pointer file (`ray_current_cluster` in its temp folder, which outlives the `ray start
--head` that wrote it) and RAY_ADDRESS are both ignored, so a run never puts its actors on
someone else's cluster, nor fails on a stale pointer.

The private cluster is bound to 127.0.0.1: Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it
is first imported, and set to 0 a local Ray takes 127.0.0.1 as its node address (so Ray is
imported inside `connect`, after setting it; a Ray imported earlier, by a notebook, is told the
same). Its files (sessions, logs, sockets, Ray's pointer file) go to a folder of its own, and
its token (Ray's token authentication) lives in its processes' environment, not under the home
folder. A watchdog process owns it: when the driver ends, however it ends (Ray's agents outlive
a SIGKILLed driver by a minute), it kills every process the cluster started (each carries
MARKER in its environment) and removes the folder. Ray's runtime-env agent is kept: it ships
the package to the actors (`py_modules`).
"""

import os
import subprocess
import sys
import tempfile
import uuid
import warnings

from easgd_jax import network
from easgd_jax.errors import ConfigError

CONNECT_TIMEOUT_S = 10  # an unreachable --ray_address fails within this (or the heartbeat's)

MARKER = "EASGD_JAX_PRIVATE_RAY"  # in the environment of every process a private cluster starts

# Run with the cluster's temp folder, its marker and the driver's pid; it waits for its stdin (a
# pipe only the driver holds) to close, then kills every process carrying the marker and removes
# the folder.
WATCHDOG = """
import os, shutil, sys, psutil
folder, marker, driver = sys.argv[1], sys.argv[2], int(sys.argv[3])
sys.stdin.read()
found = []
for process in psutil.process_iter():
  try:
    if process.pid not in (driver, os.getpid()) and process.environ().get(MARKER) == marker:
      found.append(process)
  except psutil.Error:
    pass
for process in found:
  try:
    process.kill()
  except psutil.Error:
    pass
psutil.wait_procs(found, timeout=10)
shutil.rmtree(folder, ignore_errors=True)
""".replace("MARKER", repr(MARKER))


class Private:
  """A private cluster's watchdog, and the environment to restore once it is stopped."""

  def __init__(self, folder, environment):
    self.saved = {name: os.environ.get(name) for name in [*environment, "RAY_AUTH_MODE"]}
    os.environ.update(environment)
    marker = environment[MARKER]
    self.watchdog = subprocess.Popen(  # its own session: a Ctrl-C or a group kill spares it
      [sys.executable, "-c", WATCHDOG, folder, marker, str(os.getpid())],
      stdin=subprocess.PIPE,
      start_new_session=True,
    )

  def stop(self):
    self.watchdog.stdin.close()  # its cue
    try:
      self.watchdog.wait(timeout=30)
    except subprocess.TimeoutExpired:
      pass
    for name, value in self.saved.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


def connect(config):
  """Join --ray_address, or start a private Ray on 127.0.0.1; returns what `shutdown` stops
  (a Private), or None when nothing was started."""
  imported = "ray" in sys.modules
  if config.ray_address is None:  # before Ray is imported, and for the processes it starts
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
  import ray

  if ray.is_initialized():  # a notebook or a test session connected already
    return None
  if config.ray_address is None and imported:  # imported earlier: it read the variable then
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  runtime_env = {"py_modules": [package]}  # the code travels to every node with the job
  options = dict(runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
  if config.ray_address is None:
    return _start_private(ray, options)
  _check_ray_answers(config.ray_address, min(CONNECT_TIMEOUT_S, config.heartbeat_timeout_s))
  try:
    ray.init(address=config.ray_address, **options)
  except (ConnectionError, RuntimeError, ValueError) as error:
    raise ConfigError(
      f"--ray_address={config.ray_address}: cannot join a Ray cluster there "
      f"({type(error).__name__}: {str(error).splitlines()[0][:120]}); start one with "
      f"`ray start --head` or check the address"
    ) from None
  return None


def _start_private(ray, options):
  """Ray's processes and files in a folder of their own under /tmp (its unix sockets' paths must
  stay short), owned by a watchdog from before the first one starts."""
  folder = tempfile.mkdtemp(prefix="easgd_jax_ray_", dir=os.environ.get("RAY_TMPDIR", "/tmp"))
  environment = {MARKER: uuid.uuid4().hex}
  if not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(os.environ):  # none under home
    environment["RAY_AUTH_TOKEN"] = uuid.uuid4().hex
  private = Private(folder, environment)
  try:
    with warnings.catch_warnings():  # Ray starts its processes by fork + exec: no JAX state
      warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
      cpus = max(os.cpu_count() or 1, 2)
      ray.init(address="local", _temp_dir=folder, include_dashboard=False, num_cpus=cpus, **options)
  except BaseException:
    shutdown(private)
    raise
  return private


def _check_ray_answers(address, timeout_s):
  """HOST:PORT must answer as a gRPC service (a Ray head's GCS) within `timeout_s`: ray.init
  would retry for long at an address nothing answers at, and hang at one that isn't gRPC."""
  if address == "auto":
    return  # Ray looks up the cluster on this machine and fails fast when there is none
  host, port = network.split(address)
  found = network.listener(host, port, timeout_s)
  if found != "grpc":
    what = "nothing answers there" if found is None else "what answers there is not Ray (no gRPC)"
    raise ConfigError(
      f"--ray_address={address}: {what}; give HOST:PORT of a running head node (`ray start "
      f"--head` prints it) or 'auto' on a node of the cluster"
    )


def shutdown(private):
  """Stop the private cluster `connect` started, if any, and remove its folder (a joined
  cluster stays joined: a notebook's or a test session's)."""
  if private is None:
    return
  import ray

  if ray.is_initialized():
    ray.shutdown()
  private.stop()

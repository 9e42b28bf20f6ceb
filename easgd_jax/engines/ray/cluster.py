"""Joining a Ray cluster, or starting an embedded one on loopback, for `--engine=ray`.

Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it is first imported: set to 0, a local Ray
takes 127.0.0.1 as its node address instead of the machine's network address. So this module
imports Ray only inside `connect`, after setting it for an embedded Ray (and only then: a joined
cluster keeps its own addresses; a Ray imported earlier, by a notebook, is told the same), and
the engine modules that import Ray at the top
(engines/ray.py, engines/ray_actors.py) are imported after `connect`.
"""

import os
import socket
import sys
import warnings

from easgd_jax.errors import ConfigError

CONNECT_TIMEOUT_S = 10  # an unreachable --ray_address fails within this


def connect(config):
  """Join --ray_address, or start an embedded local Ray bound to 127.0.0.1; True if started."""
  imported = "ray" in sys.modules
  if config.ray_address is None:  # before Ray is imported, and for the processes it starts
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
  import ray

  if ray.is_initialized():  # a notebook or a test session connected already
    return False
  if config.ray_address is None and imported:  # imported earlier: it read the variable then
    ray._private.ray_constants.ENABLE_RAY_CLUSTER = False
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  runtime_env = {"py_modules": [package]}  # the code travels to every node with the job
  options = dict(runtime_env=runtime_env, log_to_driver=False, configure_logging=False)
  if config.ray_address is None:
    with warnings.catch_warnings():  # Ray starts its processes by fork + exec: no JAX state
      warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
      ray.init(include_dashboard=False, num_cpus=max(os.cpu_count() or 1, 2), **options)
    return True
  _check_reachable(config.ray_address)
  try:
    ray.init(address=config.ray_address, **options)
  except (ConnectionError, RuntimeError, ValueError) as error:
    raise ConfigError(
      f"--ray_address={config.ray_address}: cannot join a Ray cluster there "
      f"({type(error).__name__}: {str(error).splitlines()[0][:120]}); start one with "
      f"`ray start --head` or check the address"
    ) from None
  return False


def _check_reachable(address):
  """HOST:PORT must accept a connection within CONNECT_TIMEOUT_S (ray.init would retry long)."""
  if address == "auto":
    return  # Ray looks up the cluster on this machine and fails fast when there is none
  host, _, port = address.rpartition(":")
  try:
    socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
  except (OSError, ValueError) as error:
    raise ConfigError(
      f"--ray_address={address}: no Ray cluster answers there ({error}); give HOST:PORT of a "
      f"running head node (`ray start --head` prints it) or 'auto' on a node of the cluster"
    ) from None


def shutdown(started):
  import ray

  if started and ray.is_initialized():
    ray.shutdown()

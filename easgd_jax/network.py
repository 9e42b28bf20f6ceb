"""What a run opens to the network, checked before anything listens or joins.

Process 0 of a multi-process run serves JAX's coordinator (an unauthenticated gRPC service), and
Ray's head serves its GCS. Left to itself, JAX binds its coordinator on every interface; here it
binds the one address the run names, a port already taken is one line instead of a crash, and a
peer checks that what answers at an address speaks gRPC before handing it to a library that
would abort the process or hang on anything else.
"""

import ipaddress
import socket
import time

from easgd_jax.errors import ConfigError

# An HTTP/2 client's preface and an empty SETTINGS frame. Every HTTP/2 server (gRPC runs on it)
# answers with a SETTINGS frame of its own first: 9 header bytes, type 0x4.
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_SETTINGS = 0x4


def split(address):
  """(host, port) of HOST:PORT; an IPv6 host may be bracketed ([::1]:12345)."""
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


def join(host, port):
  return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listener(host, port, timeout_s):
  """What listens at host:port: "grpc" (it answers an HTTP/2 preface as an HTTP/2 server does),
  "other" (it accepts a connection, then nothing of the kind), or None (nothing accepts)."""
  head = b""
  try:
    connection = socket.create_connection((host, port), timeout=timeout_s)
  except OSError:
    return None
  try:
    with connection:
      connection.sendall(_PREFACE)
      while len(head) < 9:
        chunk = connection.recv(9 - len(head))
        if not chunk:
          break
        head += chunk
  except OSError:
    pass
  return "grpc" if len(head) == 9 and head[3] == _SETTINGS else "other"


def bind_address(coordinator_address, bind=None):
  """HOST:PORT process 0's coordinator listens on, or ConfigError (one line).

  `bind` (--coordinator_bind_address) when given, else --coordinator_address itself when its
  host is an IP address of this machine; a host name (it may resolve to another address here
  than on the peers, as Debian's 127.0.1.1 does), an address of another machine (behind NAT)
  or the unspecified address (every interface) must be said with --coordinator_bind_address.
  """
  flag, address = (
    ("coordinator_bind_address", bind) if bind else ("coordinator_address", coordinator_address)
  )
  host, port = split(address)
  if host == "localhost":
    host = "127.0.0.1"
  advice = f"give --coordinator_bind_address=IP:{port} with an IP address of this machine"
  try:
    ip = ipaddress.ip_address(host)
  except ValueError:
    raise ConfigError(
      f"--{flag}={address} names a host, not an address: process 0 listens on one address of "
      f"this machine only; give its IP address, or {advice}"
    ) from None
  if ip.is_unspecified and not bind:
    raise ConfigError(
      f"--coordinator_address={address} would listen on every interface; say so with "
      f"--coordinator_bind_address={address}, or {advice}"
    )
  if _cannot_bind(ip, 0):
    raise ConfigError(
      f"--{flag}={address}: {ip} is not an address of this machine (behind NAT?); {advice}"
    )
  taken = _cannot_bind(ip, port)  # bound, never listening: no peer mistakes it for the service
  if taken:
    raise ConfigError(
      f"--{flag}={address}: port {port} is in use on {ip} ({taken.strerror}); choose another "
      f"port for every process"
    )
  return join(str(ip), port)


def _cannot_bind(ip, port):
  """The OSError binding ip:port here raises (SO_REUSEADDR: a TIME_WAIT is no obstacle, a
  listener is), or None."""
  family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
  with socket.socket(family, socket.SOCK_STREAM) as probe:
    probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      probe.bind((str(ip), port))
    except OSError as error:
      return error
  return None


def wait_for_coordinator(address, timeout_s):
  """Return once a gRPC service answers at `address` (HOST:PORT); ConfigError after `timeout_s`.

  jax.distributed.initialize in a process other than 0 retries for its whole timeout and then
  aborts the process with a C++ stack trace, also when what listens there is not a coordinator;
  a probe first turns both into one line.
  """
  host, port = split(address)
  try:
    socket.getaddrinfo(host, port)
  except socket.gaierror as error:
    raise ConfigError(
      f"--coordinator_address={address}: unknown host {host} ({error.strerror})"
    ) from None
  deadline, listening = time.monotonic() + timeout_s, False
  while True:
    found = listener(host, port, timeout_s=min(2.0, timeout_s))
    if found == "grpc":
      return
    listening = listening or found == "other"
    if time.monotonic() >= deadline:
      if listening:
        raise ConfigError(
          f"what listens at --coordinator_address={address} is not a JAX coordinator (it does "
          f"not answer gRPC within --heartbeat_timeout_s={timeout_s}); check the address"
        )
      raise ConfigError(
        f"nothing answers at --coordinator_address={address} after --heartbeat_timeout_s="
        f"{timeout_s}: start process 0 first, or check the address"
      )
    time.sleep(0.2)

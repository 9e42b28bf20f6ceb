"""The run's folder: who may use it (one live run at a time) and whether it can be used at all."""

import fcntl
import os
import tempfile

from easgd_jax.errors import ConfigError


class Busy(ConfigError):
  """Another live process holds the workdir."""


class Lock:
  """One run per workdir: an OS lock (`fcntl.flock`) on WORKDIR/.lock, held while the run lives.

  The kernel drops the lock when its process dies, however it dies, so a lock left by a killed
  run is simply taken over; the pid written into the file is only there for the message.
  """

  NAME = ".lock"

  def __init__(self, workdir):
    self.path = os.path.join(workdir, self.NAME)
    self._file = None

  def acquire(self):
    """Take the lock (creating the workdir if needed) or raise Busy naming the holder's pid."""
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    handle = open(self.path, "a+")
    try:
      fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      handle.seek(0)
      holder = handle.read().strip() or "unknown"
      handle.close()
      raise Busy(
        f"{os.path.dirname(self.path)} is in use by a live run (pid {holder}): wait for it to "
        f"finish or stop it, or use another --workdir"
      ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    self._file = handle
    return self

  def release(self):
    if self._file is not None:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
      self._file = None

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc_info):
    self.release()


def check_workdir(path):
  """Raise ConfigError, one line, when `path` can't be a run's folder; leave no trace either way.

  The folder may exist (a resume) or not yet (the run creates it and its parents); either way the
  nearest existing folder on the path must take new entries, which a probe folder, created and
  removed at once, shows for certain (a read-only mount, /proc, a missing permission).
  """
  target = os.path.abspath(path)
  if os.path.lexists(target) and not os.path.isdir(target):
    raise ConfigError(f"--workdir={path} is a file, not a folder; use another --workdir")
  existing = target
  while True:
    try:
      os.stat(existing)
      break
    except (FileNotFoundError, NotADirectoryError):  # not there yet, or a file above it
      existing = os.path.dirname(existing)
    except OSError as error:  # e.g. a name too long
      raise ConfigError(f"--workdir={path}: {error.strerror}; use another --workdir") from None
  if not os.path.isdir(existing):
    raise ConfigError(
      f"--workdir={path} lies under {existing}, which is a file, not a folder; use another "
      f"--workdir"
    )
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=existing))
  except OSError as error:
    raise ConfigError(
      f"--workdir={path}: can't create a folder in {existing} ({error.strerror}); use another "
      f"--workdir"
    ) from None

"""The run's folder: who may use it (one live run at a time), whether it can be used at all, and
writing into it when the disk fills."""

import contextlib
import errno
import fcntl
import glob
import os
import shutil
import sys
import tempfile
import time

from easgd_jax.errors import ConfigError


@contextlib.contextmanager
def writing(path, partial):
  """A block that writes `path` by way of `path` + `partial` (+ any suffix), which is removed if
  the block fails; a full disk is then OSError(ENOSPC) naming `path`, whatever the writer
  raised (tensorstore: a ValueError).

  Orbax's event loop is closed by then, which tensorstore's writes still in flight find: the
  interpreter's report of that (an "exception ignored") is left out, the run ends on its line.
  """
  hook = sys.unraisablehook
  sys.unraisablehook = lambda u: None if str(u.exc_value) == "Event loop is closed" else hook(u)
  try:
    yield
    sys.unraisablehook = hook
  except Exception as error:
    for leftover in glob.glob(f"{glob.escape(path + partial)}*"):
      _remove(leftover)
    if _disk_full(error):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path) from None
    raise


def _remove(folder, watch_s=0.5, patience_s=3.0):
  """Remove `folder`, and again while writes still in flight (tensorstore's threads) put files
  back into it: for `watch_s`, and on while it is there, `patience_s` at most."""
  start = time.monotonic()
  while time.monotonic() - start < watch_s or (
    os.path.lexists(folder) and time.monotonic() - start < patience_s
  ):
    shutil.rmtree(folder, ignore_errors=True)
    time.sleep(0.02)


def _disk_full(error):
  """Whether `error` or one it came from is a full disk (tensorstore's: a ValueError)."""
  while error is not None and getattr(error, "errno", None) not in (errno.ENOSPC, errno.EDQUOT):
    if f"os_error_code='{errno.ENOSPC}'" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return error is not None


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

  def acquire(self, shared=False):
    """Take the lock (creating the workdir if needed) or raise Busy naming the holder's pid.

    `shared`: to read only (several may hold it, never beside a live run), writing nothing; a
    later `acquire()` makes it exclusive and writes this pid.
    """
    if self._file is None:
      try:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "a+")
      except OSError as error:
        raise ConfigError(
          f"--workdir={os.path.dirname(self.path)}: can't write in it ({error.strerror}); use "
          f"another --workdir"
        ) from None
    try:
      fcntl.flock(self._file, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
      self._file.seek(0)
      holder = self._file.read().strip() or "unknown"
      self.release()
      raise Busy(
        f"{os.path.dirname(self.path)} is in use by a live run (pid {holder}): wait for it to "
        f"finish or stop it, or use another --workdir"
      ) from None
    if not shared:
      self._file.seek(0)
      self._file.truncate()
      self._file.write(f"{os.getpid()}\n")
      self._file.flush()
    return self

  @property
  def held(self):
    return self._file is not None

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

  An existing folder (a resume, or a finished run relaunched) is only looked at, so that a run
  which then has nothing to do writes nothing. A folder not there yet is created by the run,
  with its parents: the nearest existing folder on the path must take new entries, which a
  probe folder created and removed there at once shows for certain (a read-only mount, /proc,
  a missing permission).
  """
  if not path:
    raise ConfigError("--workdir= is empty: name a folder, or leave --workdir out to keep no files")
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
  if existing == target:  # what can't be seen here, the lock's first write reports
    if os.access(target, os.W_OK | os.X_OK) and not os.statvfs(target).f_flag & os.ST_RDONLY:
      return
    raise ConfigError(f"--workdir={path}: can't write in it; use another --workdir")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=existing))
  except OSError as error:
    raise ConfigError(
      f"--workdir={path}: can't create a folder in {existing} ({error.strerror}); use another "
      f"--workdir"
    ) from None

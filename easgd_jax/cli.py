"""The command line, for run.py and every study: flags generated from Config's fields, --config
files, and the one mapping from how a run ends to its exit code.

Each Config field is one flag of the same name, type, default and help (config.py declares them
once). `--config=FILE` names an ml_collections config file whose `get_config()` returns Config's
fields (experiments/configs/); `--config.FIELD=VALUE` edits one, and a flat flag given on the
command line overrides the file's field, logged as such. Both ways end in the same
`Config(**values).validate()`.

Exit codes (`run`): 0 complete; 1 the run failed (DivergenceError, WorkerFailure, a full disk:
OSError ENOSPC, one line naming the path); 2 bad input, nothing written (ConfigError: one line
saying what to change); 3 the Ray parameter server was lost (ServerLost: the same command
resumes); 128 + the signal when SIGTERM / SIGINT stopped it, after a checkpoint (Preempted) or,
with no workdir, once every worker stopped (Interrupted); 130 on a Ctrl-C before training.
"""

import dataclasses
import difflib
import errno
import os
import sys
import types

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from easgd_jax import errors
from easgd_jax.config import FIELDS, Config
from easgd_jax.errors import BAD_INPUT, ConfigError, Preempted

FLAGS = flags.FLAGS
DEFAULTS = Config()
TYPES = (str, int, float, bool, tuple)
DEFINES = (flags.DEFINE_string, flags.DEFINE_integer, flags.DEFINE_float, flags.DEFINE_bool)
DEFINES += (flags.DEFINE_list,)  # a tuple: a comma-separated list


def define_flags():
  """One absl flag per Config field, and --config (call once, before parsing)."""
  config_flags.DEFINE_config_file(
    "config",
    None,
    "A named experiment: an ml_collections config file (experiments/configs/*.py) whose "
    "get_config() returns Config's fields; edit one with --config.FIELD=VALUE. Flat flags given "
    "on the command line override its fields.",
  )
  for field in dataclasses.fields(Config):
    kind = field.type
    if isinstance(kind, types.UnionType):  # X | None: unset by default
      kind = next(k for k in kind.__args__ if k is not type(None))
    define = dict(zip(TYPES, DEFINES, strict=True))[kind]
    default = field.default
    if kind is tuple:
      default = list(map(str, default))
    define(field.name, default, field.metadata["help"])


def exit_bad_input(message):
  """Exit with BAD_INPUT after one line on stderr, `error: MESSAGE`."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(BAD_INPUT)


def run(main):
  """main(), its ending mapped to the exit codes above: one line on stderr, no traceback."""
  try:
    return main()
  except ConfigError as error:
    exit_bad_input(error)
  except errors.Interrupted as error:
    print(f"interrupted: {error}", file=sys.stderr)
    sys.exit(error.exit_code)
  except KeyboardInterrupt:
    print("interrupted: every worker stopped", file=sys.stderr)
    sys.exit(130)
  except (errors.DivergenceError, errors.WorkerFailure, errors.ServerLost) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(error.exit_code)
  except Preempted as error:
    print(f"stopped: {error}", file=sys.stderr)
    sys.exit(error.exit_code)
  except OSError as error:
    if error.errno not in (errno.ENOSPC, errno.EDQUOT):
      raise
    print(f"error: {_disk_full(error.filename)}", file=sys.stderr)
    sys.exit(1)


def _disk_full(path):
  """The one line for a full disk: the path written and the filesystem it is on."""
  if not path:
    return "no space left on the device: free space, then run the same command to resume"
  mount = os.path.abspath(path)
  while not os.path.ismount(mount):
    mount = os.path.dirname(mount)
  return (
    f"no space left writing {path} (the filesystem at {mount} is full): free space there, then "
    f"run the same command to resume from the last checkpoint"
  )


def start(main):
  """app.run(main) with logs on stderr and the flag errors of `parse_flags`."""
  FLAGS.set_default("logtostderr", True)
  app.run(main, flags_parser=parse_flags)


def config_from_flags():
  """The run's Config: the flat flags, or with --config its file's fields under explicit flags."""
  overrides = None
  if FLAGS["config"].present:
    values, overrides = values_from_config_file()
  else:
    values = {name: FLAGS[name].value for name in FIELDS}
    values["synthetic_shape"] = _shape(values["synthetic_shape"])
  config = Config(**values).validate()
  if overrides:  # once the settings are known to be good: a bad one is the only line on stderr
    logging.info("%s", overrides)
  return config


def values_from_config_file():
  """(Config's fields, a line naming the flat flags that override the file's fields, or None).

  The fields are --config's ConfigDict's, each flat flag given explicitly overriding one.

  A flat flag is written into the ConfigDict, so that a field computed from it follows (alpha =
  0.9 / num_devices in easgd_cifar10.py). The moving rate has two spellings and a run takes one:
  a flat --rho replaces the file's alpha, a flat --alpha the file's rho.
  """
  path = config_flags.get_config_filename(FLAGS["config"])
  config = FLAGS.config
  if isinstance(config, dict):
    config = ml_collections.ConfigDict(config)
  if not isinstance(config, ml_collections.ConfigDict):
    try:  # ml_collections defers an error met while loading the file to the first use
      config.lock()
    except Exception as error:
      raise ConfigError(f"--config={path}: {_last_line(error)}") from None
    raise ConfigError(
      f"--config={path}: get_config() must return an ml_collections.ConfigDict (got "
      f"{type(config).__name__})"
    )
  for name in config:
    if name not in FIELDS:
      raise ConfigError(f"--config={path}: {_unknown_field(name)}")
  flat = {name: FLAGS[name].value for name in FIELDS if FLAGS[name].present}
  if "synthetic_shape" in flat:
    flat["synthetic_shape"] = _shape(flat["synthetic_shape"])
  before = {name: config.get(name, getattr(DEFAULTS, name)) for name in FIELDS}
  notes, replaced = [], set()
  for given, other in (("rho", "alpha"), ("alpha", "rho")):
    if given in flat and other not in flat and before[other] is not None:
      notes.append(f"; --{given} replaces the file's {other}={_show(before[other])}")
      replaced.add(other)
      if other in config:
        config[other] = None
  for name, value in flat.items():
    if name in config:
      try:
        config[name] = value
      except (TypeError, ValueError) as error:
        raise ConfigError(f"--{name}={value}: {_last_line(error)}") from None
  values = {name: config.get(name, getattr(DEFAULTS, name)) for name in FIELDS}
  values.update({name: value for name, value in flat.items() if name not in config})
  values["synthetic_shape"] = _shape(values["synthetic_shape"])
  if not flat:
    return values, None
  changes = ", ".join(f"{name}={_show(before[name])} -> {_show(v)}" for name, v in flat.items())
  for name in FIELDS:  # fields the file computes from an overridden one
    if name not in flat and name not in replaced and values[name] != before[name]:
      notes.append(f"; {name}={_show(before[name])} -> {_show(values[name])} follows")
  return values, f"flags given on the command line override {path}: {changes}{''.join(notes)}"


def _unknown_field(name):
  close = difflib.get_close_matches(name, FIELDS, n=1)
  return (
    f"unknown field '{name}'"
    + (f" (did you mean '{close[0]}'?)" if close else "")
    + "; a config's fields are Config's, the flags of run.py --help"
  )


def _shape(value):
  """synthetic_shape as a tuple of ints, from the flag's strings or a config file's ints."""
  try:
    if any(isinstance(v, bool) or not isinstance(v, int | str) for v in value):
      raise ValueError
    return tuple(int(v) for v in value)
  except (TypeError, ValueError):
    shown = ",".join(map(str, value)) if isinstance(value, list | tuple) else value
    raise ConfigError(f"--synthetic_shape must be three integers H,W,C (got {shown})") from None


def _show(value):
  return ",".join(map(str, value)) if isinstance(value, tuple) else f"{value}"


def _last_line(error):
  """The line that says what went wrong: a traceback's last line, or the message itself."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  return lines[-1] if lines else type(error).__name__


def parse_flags(argv):
  """absl's parser, whose errors (--steps=abc, an unknown flag) are one `error:` line and exit
  2 like any bad input (absl's own: two lines and exit 1), also for a --config file that fails.

  ml_collections loads the file while absl parses: a missing file, one without get_config(), a
  get_config() that raises, or an override of a field the file lacks (--config.tua=4) would
  otherwise end in a traceback or a several-line message.
  """
  path = _config_argument(argv)
  if path is not None:
    file = path.split(":", 1)[0]  # config_flags passes what follows a colon to get_config
    if not os.path.isfile(file):
      exit_bad_input(f"--config={path}: no such file")
    for name in _config_overrides(argv):
      if name not in FIELDS:
        exit_bad_input(f"--config.{name}: {_unknown_field(name)}")
  try:
    return FLAGS(argv)
  except flags.Error as error:
    message = str(error)
    if "Error whilst parsing config file" in message:  # get_config raised: keep its last line
      message = f"--config={path}: get_config() raised {_last_line(error)}"
    exit_bad_input(message)
  except Exception as error:  # the file's own code failed to load, or has no get_config
    if isinstance(error, AttributeError) and "get_config" in str(error):
      exit_bad_input(f"--config={path}: the file defines no get_config()")
    if isinstance(error, AttributeError):  # --config.FIELD of a Config field the file lacks
      exit_bad_input(
        f"--config={path}: a --config.FIELD override names a field the file does not set "
        f"({_last_line(error)}); use the flat flag --FIELD instead"
      )
    exit_bad_input(
      f"--config={path}: loading it raised {type(error).__name__}: {_last_line(error)}"
    )


def _config_argument(argv):
  """The value of --config in argv (`--config=FILE` or `--config FILE`), or None."""
  for i, arg in enumerate(argv[1:], start=1):
    if arg == "--":
      break
    if arg.startswith(("--config=", "-config=")):
      return arg.split("=", 1)[1]
    if arg in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _config_overrides(argv):
  """The field names of every --config.FIELD[=VALUE] (or --noconfig.FIELD) in argv."""
  for arg in argv[1:]:
    if arg == "--":
      break
    name = arg.lstrip("-").split("=", 1)[0]
    for prefix in ("config.", "noconfig."):
      if arg.startswith("-") and name.startswith(prefix):
        yield name[len(prefix) :]

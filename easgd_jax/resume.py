"""The resume rules: what a relaunch on an existing workdir may change, and when it is finished.

`train.train_and_evaluate` asks these before it builds anything, so a flag that a resume can't
honour is one line and exit 2 with nothing written, and a finished run stays finished.
"""

import dataclasses
import json
import os

from easgd_jax import checkpoints, engines, reporting
from easgd_jax.config import OTHERWISE
from easgd_jax.errors import ConfigError

# Config fields a resumed run may change: none of them changes the math of the steps already
# taken. Every other field, including any added later, must equal the workdir's config.json.
RESUMABLE = frozenset(
  {
    "steps",  # may only rise (a lower one on a finished run is "complete")
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "target_accuracy",
    "target_loss",
    "heartbeat_timeout_s",
    "fail_fast",
    "worker_threads",  # how the workers share the host, not what they compute
    "data_dir",  # where the same dataset is read from
    "inject_nan",  # fault injection for one launch
    "inject_failure",
    "coordinator_address",  # a relaunched cluster may get another port
    "coordinator_bind_address",
    "process_id",  # every process of a multi-process run reads the same config.json
    "progress_every_s",
    "engine",  # the checkpoint is the same on every engine that runs the algorithm
    "ray_address",
    "ray_pipeline",
    "ray_worker_gpus",
    "max_worker_restarts",
    "round_timeout_s",
    "min_workers",
  }
)


def fix_decay_steps(config, workdir):
  """--decay_steps is fixed at the first launch (default: its --steps), so that raising --steps
  on a resume does not rewrite the schedule of the steps already taken."""
  if config.decay_steps is not None:
    return config
  saved = saved_config(workdir) or {}
  decay_steps = saved.get("decay_steps") or saved.get("steps") or config.steps
  return dataclasses.replace(config, decay_steps=decay_steps)


def fix_unset(config, workdir):
  """The settings left unset take what the workdir's run resolved them to (its config.json), so
  a resume never depends on an algorithm's default that changed since."""
  saved = saved_config(workdir) or {}
  names = [*OTHERWISE, "optimizer"] + (["alpha"] if config.rho is None else [])
  found = {n: saved[n] for n in names if getattr(config, n) is None and saved.get(n) is not None}
  return dataclasses.replace(config, **found)


def fix_measured(config, workdir):
  """What the engine measured at the first launch (the simulated clock's compute and service
  times, in its config.json) is what every relaunch uses, so the run stays the same."""
  saved = saved_config(workdir) or {}
  measured = {
    flag: saved[flag]
    for flag in engines.measured_fields(config)
    if getattr(config, flag) is None and saved.get(flag) is not None
  }
  return dataclasses.replace(config, **measured)


def saved_config(workdir):
  """The config of the workdir's run: its config.json, else (deleted) its newest checkpoint's,
  which the checkpoint's checksummed record carries; None for a new workdir."""
  return _config_json(workdir) or (workdir and checkpoints.newest_config(workdir)) or None


def _config_json(workdir):
  path = workdir and os.path.join(workdir, reporting.CONFIG)
  if not path or not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict):
      raise ValueError("not a JSON object")
  except (OSError, ValueError) as error:
    raise ConfigError(
      f"{path} is damaged ({type(error).__name__}: {str(error)[:80]}); move it away to start "
      f"over, or use another --workdir"
    ) from None
  return saved


def prepare(config, workdir):
  """(config, finished): `config` with what the workdir's first launch fixed (--decay_steps,
  the measured costs), and `check`'s answer."""
  config = fix_measured(fix_decay_steps(config, workdir), workdir)
  return config, check(config, workdir)


def check(config, workdir):
  """(step, workdir) when the workdir's run is finished at or past --steps, else None.

  Raises ConfigError (nothing written) for a workdir that is not a run's (a study's, or one
  whose outputs' names are taken), a config.json that can't be read, or a flag that a resume
  can't honour (against config.json and the newest checkpoint's own config both), including a
  lower --steps on a run that is not finished.
  """
  _check_layout(workdir)
  written, newest = _config_json(workdir), workdir and checkpoints.newest_config(workdir)
  saved = written or newest
  if saved is None:
    return None
  for each in (written, newest):
    if each:
      check_same_experiment(each, config)
  done = max([*checkpoints.saved_steps(workdir), summary_step(workdir)])
  old_steps = saved.get("steps", config.steps)
  if done >= old_steps and config.steps <= done:
    return done, workdir
  if config.steps < old_steps:
    raise ConfigError(
      f"the workdir holds an unfinished run with --steps={old_steps}, not {config.steps}: "
      f"--steps may only rise on resume; use --steps={old_steps} (or more), or another --workdir"
    )
  return None


STUDY_RUNS = "runs"  # a study's workdir holds its runs here (easgd_jax/study)
FILES = (reporting.CONFIG, reporting.METRICS, reporting.SUMMARY, reporting.PARAMS, reporting.PLOT)


def _check_layout(workdir):
  if not workdir or not os.path.isdir(workdir):
    return
  if os.path.isdir(os.path.join(workdir, STUDY_RUNS)):
    raise ConfigError(
      f"--workdir={workdir} holds a study (its {STUDY_RUNS}/ folder), not a run: use another "
      f"--workdir"
    )
  folder = os.path.join(workdir, checkpoints.FOLDER)
  if os.path.lexists(folder) and not os.path.isdir(folder):
    raise ConfigError(f"{folder} is a file, not a folder: move it away, or use another --workdir")
  for name in FILES:
    if os.path.isdir(os.path.join(workdir, name)):
      raise ConfigError(
        f"{os.path.join(workdir, name)} is a folder, where the run writes a file: move it away, "
        f"or use another --workdir"
      )


def summary_step(workdir):
  try:
    with open(os.path.join(workdir, reporting.SUMMARY)) as f:
      return int(json.load(f)["steps"])
  except (OSError, ValueError, KeyError, TypeError):
    return 0


def outputs_complete(workdir):
  names = (reporting.SUMMARY, reporting.PARAMS, reporting.METRICS)
  return all(os.path.exists(os.path.join(workdir, name)) for name in names) and summary_step(
    workdir
  )


def finished_summary(workdir):
  with open(os.path.join(workdir, reporting.SUMMARY)) as f:
    summary = json.load(f)
  summary.update(complete=True, history=reporting.read_metrics(workdir), state=None)
  return summary


def check_same_experiment(saved, config):
  """ConfigError naming the first field of `config` that a resume of `saved` cannot honour.

  The rule covers every field of the Config: all must equal the workdir's config.json except
  those in RESUMABLE; `steps` may rise. A field missing from an older config.json is compared
  with its default, the value that run used.
  """
  defaults = type(config)().to_dict()
  new_values = config.to_dict()
  old_config = type(config)(**{k: v for k, v in saved.items() if k in new_values})
  if not _same_number(_moving_rate(saved, defaults), config.moving_rate):
    raise ConfigError(
      f"the workdir holds a run with moving rate alpha = {_moving_rate(saved, defaults):g} "
      f"({old_config.elastic_flags}), not {config.moving_rate:g} ({config.elastic_flags}): use "
      f"another --workdir, or the same flags to resume it"
    )
  for field, new in new_values.items():
    if field in ("rho", "alpha"):  # compared as the moving rate they give, above
      continue
    old = saved.get(field, defaults[field])
    if field == "decay_steps" and old is None:  # older config.json: its schedule spanned --steps
      old = saved.get("steps")
    if field == "optimizer" and old is None:  # older config.json: the default it ran with
      delta = saved.get("momentum", defaults["momentum"])
      old = "adamw" if saved.get("algorithm") == "diloco" else ("nesterov" if delta else "sgd")
    if isinstance(new, tuple) and isinstance(old, list):
      old = tuple(old)
    if field == "engine" and not engines.same_checkpoints(old, new):
      raise ConfigError(
        f"the workdir holds a run on --engine={old}, not {new}: its checkpoints are that "
        f"engine's own; use another --workdir, or --engine={old} to resume it"
      )
    if field == "steps" or field in RESUMABLE or old == new:
      continue
    raise ConfigError(
      f"the workdir holds a run with --{field}={_flag_value(old)}, not {_flag_value(new)}: "
      f"use another --workdir, or the same --{field} to resume it"
    )
  unknown = sorted(set(saved) - set(new_values))
  if unknown:
    raise ConfigError(
      f"the workdir's config.json has fields this version does not know ({', '.join(unknown)}): "
      f"it was written by another version; use another --workdir"
    )


def _moving_rate(saved, defaults):
  if saved.get("alpha") is not None:
    return saved["alpha"]
  rho = saved.get("rho", defaults["rho"])
  return saved.get("learning_rate", defaults["learning_rate"]) * (1.0 if rho is None else rho)


def _same_number(a, b):
  return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)


def _flag_value(value):
  if isinstance(value, tuple | list):
    return ",".join(map(str, value))
  return "(unset)" if value is None else value

"""What a run leaves in its workdir: config.json, metrics.jsonl, summary.json, accuracy.png.

(Checkpoints, in workdir/checkpoints, are easgd_jax/checkpoints.py's.)

Whole-file outputs are written to a temporary file and renamed, so an interrupted run never
leaves a half-written file; metrics.jsonl gets one complete line per evaluation, flushed at once.
"""

import contextlib
import json
import os

import jax
import numpy as np

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CONFIG = "config.json"
PLOT = "accuracy.png"
PARAMS = "params.npz"  # the trained weights (the center for EASGD), keyed by their tree path
APPLIED = "applied_updates.jsonl"  # worker/master family: every update the master applied


@contextlib.contextmanager
def _atomic(path, suffix):
  """A temporary path beside `path`, renamed onto it when the block succeeds, removed if not.

  The temporary file is created as open() creates any file, mode 0o666 less the umask (0644
  under umask 022); tempfile.mkstemp's 0600 would survive the rename.
  """
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".tmp-{os.urandom(8).hex()}{suffix}")
  os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_text(path, text):
  """Write `text` to `path` atomically (temp file in the same folder, then rename)."""
  with _atomic(path, ".txt") as tmp, open(tmp, "w") as f:
    f.write(text)


def write_json(path, obj):
  write_text(path, json.dumps(obj, indent=2, default=_jsonable) + "\n")


def save_figure(fig, path):
  """A matplotlib figure as PNG, atomically; the figure is closed."""
  import matplotlib.pyplot as plt

  fig.tight_layout()
  with _atomic(path, ".png") as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)


def save_params(path, params):
  """The parameter pytree as an .npz of plain arrays (loadable without pickle), atomically."""
  flat = {
    jax.tree_util.keystr(key): np.asarray(leaf)
    for key, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
  }
  with _atomic(path, ".npz") as tmp, open(tmp, "wb") as f:
    np.savez(f, **flat)


def save_arrays(path, arrays):
  """{name: array} as an .npz, atomically."""
  with _atomic(path, ".npz") as tmp, open(tmp, "wb") as f:
    np.savez(f, **arrays)


def plot_histogram(values, counts, path, xlabel, title=""):
  """A bar chart of `counts` at integer `values`, saved as PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axis = plt.subplots(figsize=(6, 4))
  axis.bar(values, counts, width=0.8)
  axis.set_xlabel(xlabel)
  axis.set_ylabel("updates")
  axis.grid(alpha=0.3, axis="y")
  axis.set_title(title)
  save_figure(fig, path)


def load_params(path, like=None):
  """save_params' file: {tree path: array}, or with `like` (a pytree of the same structure, e.g.
  the model's initial parameters) that pytree; ValueError when the file holds other leaves."""
  with np.load(path, allow_pickle=False) as archive:
    flat = dict(archive)
  if like is None:
    return flat
  paths = [jax.tree_util.keystr(key) for key, _ in jax.tree_util.tree_flatten_with_path(like)[0]]
  if sorted(paths) != sorted(flat):
    raise ValueError(f"{path} holds other parameters than the model's")
  return jax.tree.unflatten(jax.tree.structure(like), [flat[p] for p in paths])


def read_metrics(workdir):
  """The rows of workdir/metrics.jsonl; a torn line (a write cut by power loss) is dropped."""
  from absl import logging

  rows = []
  path = os.path.join(workdir, METRICS)
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
        if not isinstance(row, dict) or "step" not in row:
          raise ValueError("not a metrics row")
      except ValueError as error:
        logging.warning("%s line %d is damaged (%s); dropped", path, number, error)
        continue
      rows.append(row)
  return rows


class MetricsLog:
  """Appends one JSON object per evaluation to workdir/metrics.jsonl (or just keeps them).

  `start()` begins a new file; `start(keep_until=step)` continues a resumed run: the rows up to
  `step` (the checkpoint's) are kept, later ones, written after that checkpoint, are dropped, so
  the file holds every evaluation exactly once.

  Every row also goes to TensorBoard event files in the workdir (tensorboardX: no TensorFlow
  needed), one scalar per number; `tensorboard --logdir=WORKDIR` (or a study's runs/) shows them.
  A resumed run purges the events after its checkpoint's step, as it does with the rows.
  """

  def __init__(self, workdir=None):
    self.workdir, self.rows, self._file, self._events = workdir, [], None, None

  def start(self, keep_until=None):
    if keep_until is not None:
      path = os.path.join(self.workdir, METRICS) if self.workdir else None
      if path and os.path.exists(path):
        self.rows = [r for r in read_metrics(self.workdir) if r["step"] <= keep_until]
    if self.workdir:
      path = os.path.join(self.workdir, METRICS)
      write_text(path, "".join(json.dumps(r, default=_jsonable) + "\n" for r in self.rows))
      self._file = open(path, "a")
      from tensorboardX import SummaryWriter

      purge = keep_until + 1 if keep_until is not None else None
      self._events = SummaryWriter(logdir=self.workdir, purge_step=purge, flush_secs=10)

  def append(self, row):
    self.rows.append(row)
    if self.workdir:
      self._file.write(json.dumps(row, default=_jsonable) + "\n")
      self._file.flush()
      for key, value in row.items():
        if key == "worker_steps":
          for j, steps in enumerate(value):
            self._events.add_scalar(f"worker_steps/{j}", steps, global_step=row["step"])
        elif key != "step" and isinstance(value, int | float):
          self._events.add_scalar(key, value, global_step=row["step"])

  def close(self):
    if self._file:
      self._file.close()
    if self._events:
      self._events.close()


class AppliedLog:
  """WORKDIR/applied_updates.jsonl: the record of every update a master applied, in the order
  applied, one line [worker, worker step, version read, version made] each (engines/base.py's
  `Applied`). Append-only; a checkpoint counts its lines, and a resume cuts it back to that
  count, so after any number of kills and relaunches each update is in it once."""

  def __init__(self, workdir=None):
    self.path = workdir and os.path.join(workdir, APPLIED)
    self.count, self._file = 0, None

  def start(self, keep):
    """Keep the first `keep` lines (a checkpoint's count), drop any written after it."""
    self.count = keep
    if not self.path:
      return
    if os.path.exists(self.path):
      offset, lines = 0, 0
      with open(self.path, "rb") as f:
        for line in f:
          if lines == keep:
            break
          offset, lines = offset + len(line), lines + 1
      if lines < keep:
        from absl import logging

        logging.warning(
          "%s holds %d of the %d updates its checkpoint counts", self.path, lines, keep
        )
      os.truncate(self.path, offset)
    self._file = open(self.path, "a")

  def append(self, entries):
    if not entries:
      return
    self.count += len(entries)
    if self._file:
      self._file.write("".join(json.dumps(entry) + "\n" for entry in entries))

  def flush(self):
    if self._file:
      self._file.flush()
      os.fsync(self._file.fileno())

  def close(self):
    if self._file:
      self._file.close()
      self._file = None


def read_applied(workdir):
  """The applied-update record of `workdir`: [[worker, worker step, read, made], ...]."""
  with open(os.path.join(workdir, APPLIED)) as f:
    return [json.loads(line) for line in f if line.strip()]


def summarize(rows, target_accuracy=None, target_loss=None):
  """Final metrics, and when `target_accuracy` (`target_loss`) is given the first evaluation
  that reached it (that loss or less): its step, samples, seconds (virtual seconds on the
  simulated cluster) and, for a text, tokens."""
  final = rows[-1]
  summary = {
    "final": final,
    "best_test_accuracy": max(r["test_accuracy"] for r in rows),
    "steps": final["step"],
    "samples": final["samples"],
    "wall_time_s": final["wall_time_s"],
    "samples_per_s": final["samples"] / max(final["wall_time_s"], 1e-9),
    "target_accuracy": target_accuracy,
  }
  if target_accuracy is not None:
    reached = next((r for r in rows if r["test_accuracy"] >= target_accuracy), None)
    summary["steps_to_target"] = reached and reached["step"]
    summary["samples_to_target"] = reached and reached["samples"]
    summary["seconds_to_target"] = reached and reached["wall_time_s"]
    if "virtual_time_s" in final:  # --engine=simulated: on the simulated cluster's clock
      summary["virtual_seconds_to_target"] = reached and reached["virtual_time_s"]
  if target_loss is not None:
    summary["target_loss"] = target_loss
    reached = next((r for r in rows if r["test_loss"] <= target_loss), None)
    for key in ("step", "samples", "tokens", "wall_time_s", "virtual_time_s"):
      if key in final:
        summary[f"{key}_to_target_loss"] = reached and reached[key]
  return summary


def plot_accuracy(rows, path, title=""):
  """Test accuracy against wall time and against steps, side by side, saved as PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, (by_time, by_step) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  accuracy = [r["test_accuracy"] for r in rows]
  clock = "virtual_time_s" if rows and "virtual_time_s" in rows[-1] else "wall_time_s"
  by_time.plot([r[clock] for r in rows], accuracy, marker=".")
  by_time.set_xlabel(
    "virtual time on the simulated cluster (s)"
    if clock == "virtual_time_s"
    else "wall time (s, evaluation excluded)"
  )
  by_time.set_ylabel("test accuracy")
  by_step.plot([r["step"] for r in rows], accuracy, marker=".")
  by_step.set_xlabel("iteration")
  for axis in (by_time, by_step):
    axis.grid(alpha=0.3)
  fig.suptitle(title)
  save_figure(fig, path)


def _jsonable(value):
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)

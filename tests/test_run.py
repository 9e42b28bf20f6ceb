"""run.py end to end: accuracy on real data, the files in the workdir, and bad input."""

import json
import os

import pytest

from easgd_jax import reporting
from easgd_jax import workdir as workdir_lib
from easgd_jax.config import Config, ConfigError

import helpers
from helpers import REPO, bad_input_runs, run_cli


@pytest.mark.slow
def test_easgd_default_run_reaches_90_percent_and_writes_its_workdir(tmp_path):
  workdir = tmp_path / "easgd"
  result = run_cli(f"--workdir={workdir}", "--target_accuracy=0.9")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "step 100/2000" in result.stderr  # progress while it trains
  files = sorted(os.listdir(workdir))
  events = [f for f in files if f.startswith("events.out.tfevents.")]
  assert len(events) == 1  # TensorBoard, beside metrics.jsonl
  assert sorted(set(files) - set(events)) == sorted(
    [reporting.CONFIG, reporting.METRICS, reporting.SUMMARY, reporting.PLOT, reporting.PARAMS]
    + ["checkpoints", workdir_lib.Lock.NAME]
    + [reporting.APPLIED]  # the master's record: Algorithm 1's center is a master too
  )
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1000", "1500", "2000"]  # the last 3
  config = json.loads((workdir / reporting.CONFIG).read_text())
  assert config["algorithm"] == "easgd" and config["num_devices"] == 4
  rows = reporting.read_metrics(workdir)
  assert [r["step"] for r in rows] == list(range(100, 2001, 100))
  for key in ("step", "samples", "wall_time_s", "train_loss", "test_loss", "test_accuracy"):
    assert key in rows[0]
  assert rows[-1]["samples"] == 2000 * 32
  summary = json.loads((workdir / reporting.SUMMARY).read_text())
  assert summary["final"]["test_accuracy"] >= 0.90
  assert summary["steps_to_target"] is not None and summary["steps_to_target"] <= 2000
  assert (workdir / reporting.PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  accuracy = [
    (step, value) for tag, step, value in helpers.read_events(workdir) if tag == "test_accuracy"
  ]
  assert accuracy == [(r["step"], pytest.approx(r["test_accuracy"])) for r in rows]


BAD_INPUT = [
  (["--algorithm=adam"], "--algorithm"),
  (["--dataset=imagenet"], "--dataset"),
  (["--model=resnet"], "--model"),
  (["--learning_rate=0"], "--learning_rate"),
  (["--learning_rate=-0.1"], "--learning_rate"),
  (["--rho=-1"], "--rho"),
  (["--tau=0"], "--tau"),
  (["--batch_size=0"], "--batch_size"),
  (["--num_devices=0"], "--num_devices"),
  (["--synthetic_shape=3,3"], "--synthetic_shape"),
]


@pytest.fixture(scope="module")
def bad_input(tmp_path_factory):
  """Every BAD_INPUT run, started together (run_at_once)."""
  return bad_input_runs(tmp_path_factory, os.path.join(REPO, "run.py"), BAD_INPUT, "run")


@pytest.mark.parametrize("flags, named", BAD_INPUT, ids=[f[0] for f, _ in BAD_INPUT])
def test_bad_input_is_one_line_exit_2_and_leaves_no_files(bad_input, flags, named):
  result, workdir = bad_input[tuple(flags)]
  assert result.returncode == 2, result.stderr[-2000:]
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
  assert not workdir.exists()


def test_config_validation_names_the_flag():
  with pytest.raises(ConfigError, match="--eval_every"):
    Config(eval_every=0).validate()
  with pytest.raises(ConfigError, match="--target_accuracy"):
    Config(target_accuracy=1.5).validate()
  assert Config().validate() == Config()

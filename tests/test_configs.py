"""Named experiments: the ml_collections config files in experiments/configs/ and run.py --config.

Every file runs one step through the command its own docstring gives (CIFAR-10 on
tensorflow_datasets' mock data: it can't be prepared offline); flat flags override a file's
fields and say so; a bad config is one `error:` line, exit 2 and no workdir.
"""

import glob
import importlib.util
import json
import os
import shlex
import sys

import pytest

from easgd_jax import reporting, train
from easgd_jax.config import Config

from helpers import REPO, child_env, run_at_once, run_process

if REPO not in sys.path:  # the config files import experiments.configs.common, as run.py does
  sys.path.insert(0, REPO)

CONFIG_DIR = os.path.join(REPO, "experiments", "configs")
CONFIG_FILES = sorted(
  os.path.relpath(path, REPO)
  for path in glob.glob(os.path.join(CONFIG_DIR, "*.py"))
  if os.path.basename(path) != "common.py"  # the shared base, not a config
)
OVERRIDE = "flags given on the command line override"  # run.py's line naming them
ONE_STEP = ("--steps=1", "--eval_every=1", "--progress_every_s=0")
MOCK_EXAMPLES = 256  # per split: cifar10 configs use batches of 128
# run.py inside the process that holds tfds' mock: the mock patches tfds.data_source in-process
# only, so it must wrap run.py's main rather than the command that starts it.
MOCK_RUN = (
  "import runpy, sys\n"
  "import tensorflow_datasets as tfds\n"
  "sys.argv = sys.argv[1:]\n"
  f"with tfds.testing.mock_data(num_examples={MOCK_EXAMPLES}):\n"
  "  runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


def load_config(path):
  """A config file as a module (its get_config, its docstring), loaded by path like config_flags."""
  spec = importlib.util.spec_from_file_location("config_under_test", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def command_of(path):
  """The first line of the file's docstring, split: the command that launches it."""
  return shlex.split(load_config(path).__doc__.strip().splitlines()[0])


def run_cli(*args, mock_tfds=False, timeout=300):
  prefix = [sys.executable, "-c", MOCK_RUN] if mock_tfds else [sys.executable]
  return run_process([*prefix, "run.py", *args], cwd=REPO, env=child_env(), timeout=timeout)


def one_error_line(result):
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 2, result.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


def test_there_are_the_named_experiments():
  names = {os.path.basename(path) for path in CONFIG_FILES}
  assert {"digits.py", "easgd_cifar10.py", "eamsgd_cifar10.py", "diloco_digits.py"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES)
def test_docstring_starts_with_the_command_that_runs_this_file(path):
  command = command_of(path)
  assert command[:2] == ["python", "run.py"], command
  assert f"--config={path}" in command, command
  assert any(arg.startswith("--workdir=runs/") for arg in command), command
  # Every field is Config's and makes a valid Config as it stands.
  fields = load_config(path).get_config().to_dict()
  assert set(fields) <= {f for f in Config.__dataclass_fields__}
  Config(**fields).validate()


def test_digits_is_the_default_run():
  assert Config(**load_config("experiments/configs/digits.py").get_config().to_dict()) == Config()


@pytest.mark.parametrize("path", ["experiments/configs/easgd_cifar10.py"])
def test_cifar10_alpha_is_beta_over_p_and_follows_num_devices(path):
  config = load_config(path).get_config()
  assert (config.algorithm, config.model, config.dataset) == ("async_easgd", "cifar_cnn", "cifar10")
  assert (config.batch_size, config.tau, config.num_devices) == (128, 4, 4)
  assert config.alpha == pytest.approx(0.9 / 4)
  for p in (8, 16):  # what --config.num_devices=p does to the ConfigDict
    config.num_devices = p
    assert config.alpha == pytest.approx(0.9 / p)
  config.alpha = 0.05  # --config.alpha pins it
  config.num_devices = 4
  assert config.alpha == 0.05
  eamsgd = load_config("experiments/configs/eamsgd_cifar10.py").get_config()
  assert eamsgd.momentum == 0.99 and eamsgd.algorithm == "async_easgd"


@pytest.fixture(scope="module")
def one_step_runs(tmp_path_factory):
  """Every config file's docstring command for one step, all started together (a launch spends
  much of its time on one core: importing, compiling): {path: (CompletedProcess, workdir)}."""
  commands, workdirs = [], []
  for path in CONFIG_FILES:
    workdir = tmp_path_factory.mktemp("one_step") / "run"
    args = [a for a in command_of(path)[2:] if not a.startswith("--workdir=")]
    mock_tfds = load_config(path).get_config().dataset in ("cifar10", "mnist")
    prefix = [sys.executable, "-c", MOCK_RUN] if mock_tfds else [sys.executable]
    commands.append([*prefix, "run.py", *args, *ONE_STEP, f"--workdir={workdir}"])
    workdirs.append(workdir)
  results = run_at_once(commands, timeout=300, cwd=REPO, env=child_env())
  return dict(zip(CONFIG_FILES, zip(results, workdirs, strict=True), strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_runs_one_step_from_its_docstring_command(one_step_runs, path):
  expected = load_config(path).get_config().to_dict()
  result, workdir = one_step_runs[path]
  assert result.returncode == 0, result.stderr[-3000:]
  (line,) = [line for line in result.stderr.splitlines() if OVERRIDE in line]
  assert f"override {path}: " in line, line
  assert f"steps={expected['steps']} -> 1, eval_every={expected['eval_every']} -> 1" in line, line
  saved = json.loads((workdir / reporting.CONFIG).read_text())
  expected.update(steps=1, eval_every=1, progress_every_s=0)  # the flat flags' values
  expected["synthetic_shape"] = list(expected["synthetic_shape"])  # JSON has no tuples
  if expected["decay_steps"] is None:  # fixed at the first launch's --steps
    expected["decay_steps"] = 1
  # config.json records what a field the file leaves unset resolved to (the algorithm's default)
  resolved = train.validate(Config(**load_config(path).get_config()))
  for name, value in expected.items():
    if value is None and name not in ("decay_steps", "alpha", "rho"):
      expected[name] = getattr(resolved, name)
  assert {key: saved[key] for key in expected} == expected  # every other field the file's
  summary = json.loads((workdir / reporting.SUMMARY).read_text())
  assert summary["final"]["step"] == 1


@pytest.mark.slow
def test_flat_flags_override_the_file_and_tuples_come_from_the_file(tmp_path):
  config_file = tmp_path / "tiny.py"
  config_file.write_text(
    "from experiments.configs.common import base_config\n\n\n"
    "def get_config():\n"
    "  config = base_config()\n"
    "  config.update(algorithm='easgd', num_devices=2, dataset='synthetic', model='mlp')\n"
    "  config.update(synthetic_shape=(6, 6, 1), synthetic_train_size=64, batch_size=8)\n"
    "  config.update(steps=50, eval_every=10, alpha=0.3, progress_every_s=0)\n"
    "  return config\n"
  )
  workdir = tmp_path / "run"
  result = run_cli(
    f"--config={config_file}", "--config.tau=2", "--steps=2", "--eval_every=1",
    "--num_devices=3", "--rho=0.5", f"--workdir={workdir}",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr[-3000:]
  saved = json.loads((workdir / reporting.CONFIG).read_text())
  assert saved["synthetic_shape"] == [6, 6, 1]  # a tuple in the file
  assert (saved["steps"], saved["eval_every"], saved["num_devices"]) == (2, 1, 3)  # flat flags
  assert saved["tau"] == 2  # --config.tau
  assert (saved["rho"], saved["alpha"]) == (0.5, None)  # --rho replaces the file's alpha
  assert saved["batch_size"] == 8 and saved["synthetic_train_size"] == 64  # the file's
  (line,) = [line for line in result.stderr.splitlines() if OVERRIDE in line]
  assert f"override {config_file}: " in line
  for change in ("steps=50 -> 2", "eval_every=10 -> 1", "num_devices=2 -> 3", "rho=None -> 0.5"):
    assert change in line, line
  assert "--rho replaces the file's alpha=0.3" in line and "tau" not in line


def test_bad_config_value_from_the_command_line_is_one_line_exit_2(tmp_path):
  workdir = tmp_path / "run"
  line = one_error_line(
    run_cli("--config=experiments/configs/digits.py", "--config.tau=0", f"--workdir={workdir}")
  )
  assert "--tau" in line and "(got 0)" in line
  assert not workdir.exists()


@pytest.mark.parametrize(
  "source, named",
  [
    (  # an unknown field in the file: named, with the field it probably meant
      "from experiments.configs.common import base_config\n\n"
      "def get_config():\n  config = base_config()\n  config.tua = 4\n  return config\n",
      "unknown field 'tua' (did you mean 'tau'?)",
    ),
    (  # a hand-written ConfigDict without the shared base: the same check
      "import ml_collections\n\n"
      "def get_config():\n  return ml_collections.ConfigDict({'steps': 5, 'learning_rat': 0.1})\n",
      "unknown field 'learning_rat'",
    ),
    ("CONFIG = {'steps': 5}\n", "defines no get_config()"),
    (
      "def get_config():\n  raise ValueError('no such experiment')\n",
      "get_config() raised ValueError: no such experiment",
    ),
  ],
  ids=["unknown_field", "unknown_field_plain_configdict", "no_get_config", "get_config_raises"],
)
def test_bad_config_file_is_one_line_exit_2_naming_the_problem(tmp_path, source, named):
  config_file = tmp_path / "bad.py"
  config_file.write_text(source)
  workdir = tmp_path / "run"
  line = one_error_line(run_cli(f"--config={config_file}", f"--workdir={workdir}"))
  assert named in line and str(config_file) in line, line
  assert not workdir.exists()


@pytest.mark.parametrize(
  "args, named",
  [
    (["--config=experiments/configs/no_such.py"], "no such file"),
    (["--config=experiments/configs/digits.py", "--config.tua=4"], "--config.tua: unknown field"),
    (["--config=experiments/configs/digits.py", "--config.tau=abc"], "--config.tau=abc"),
  ],
  ids=["missing_file", "unknown_override", "unparsable_override"],
)
def test_bad_config_argument_is_one_line_exit_2(tmp_path, args, named):
  workdir = tmp_path / "run"
  line = one_error_line(run_cli(*args, f"--workdir={workdir}"))
  assert named in line, line
  assert not workdir.exists()

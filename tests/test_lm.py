"""The language-model workload end to end: the transformer on the Shakespeare windows, with every
algorithm on every engine, the text metrics against their definitions, the windows gathered on
a device against the host's, and the transformer split Megatron-style.

Runs use a tiny transformer (one block, width 16) on the first 20,000 characters of each split,
so that each takes seconds.
"""

import dataclasses
import math
import os
import sys

import jax
import numpy as np
import pytest

from easgd_jax import algorithms, core, data, partitioning, reporting, train, transformer
from easgd_jax.config import Config
from easgd_jax.engines.local import steps

from helpers import REPO, TINY_LM, child_env, run_at_once, run_process

TINY = dict(TINY_LM, progress_every_s=0, sim_compute_ms=1.0, sim_service_us=20.0)
# Steps where 12 would end before any exchange: async_diloco's 2 workers push after their own
# H = 10 inner steps each. Its threads split the run's steps as they happen to run: of 24, a split
# of 19 and 5 pushes once (the weights move by 0.35 / 2 of one push: 0.010 nats, under the bar);
# of 40, any split pushes at least 3 times (every second push, N = G = 2, also takes the Delayed
# Nesterov's momentum step). hogwild's two workers write at SGD's rate 1.0 from stale reads, both
# from their first step (each waits for the other's first): 12 steps ended at 3.56-3.97 nats in 6
# runs here and once at 4.49 in CI; 24 steps at 3.44-3.56.
STEPS = {"async_diloco": 40, "hogwild": 24}


def tiny(**fields):
  fields = {**TINY, **fields}
  if fields.get("engine", "local") != "simulated":
    fields = {k: v for k, v in fields.items() if not k.startswith("sim_")}
  return Config(**fields)


@pytest.fixture(scope="module")
def starting_loss():
  """The tiny transformer's validation loss at its initial weights (the same for every seed-0
  run whatever the algorithm)."""
  config = train.validate(tiny(algorithm="sgd"))
  dataset, _, loss_fn, params = train.setup(config)
  return core.make_evaluate(loss_fn)(params, dataset.test_images, dataset.test_labels)[0]


# On the simulated engine one algorithm of each way it steps its workers (a host schedule, threads'
# pushes, phases with a fragment in flight, workers at their own speeds): that engine runs every
# algorithm on digits against the local engine (tests/test_simulated.py), and what the
# transformer adds (its model, windows, text metrics) is the same for every algorithm.
ENGINES = {name: ["local"] for name in algorithms.REGISTRY} | {
  name: ["local", "simulated"]
  for name in ("easgd", "async_easgd", "streaming_diloco", "async_diloco")
}


@pytest.mark.parametrize(
  "algorithm, engine", [(name, engine) for name in sorted(ENGINES) for engine in ENGINES[name]]
)
def test_every_algorithm_learns_on_the_transformer_with_its_defaults(
  tmp_path, cpu_devices, starting_loss, algorithm, engine
):
  steps = STEPS.get(algorithm, 12)
  config = tiny(algorithm=algorithm, engine=engine, steps=steps, eval_every=steps)
  summary = train.train_and_evaluate(config, str(tmp_path))
  row = summary["final"]
  assert row["step"] == steps and math.isfinite(row["test_loss"])
  # 12 tiny steps: the centers of the elastic family move least (by ~0.015 nats here).
  assert row["test_loss"] < starting_loss - 0.01, (row["test_loss"], starting_loss)
  assert row["tokens"] == row["samples"] * 8  # each window predicts its 8 characters
  assert row["test_bits_per_char"] == pytest.approx(row["test_loss"] / math.log(2))


def test_the_text_metrics_are_their_definitions(cpu_devices):
  config = train.validate(tiny(algorithm="sgd"))
  dataset, model, loss_fn, params = train.setup(config)
  images, labels = dataset.test_images[:40], dataset.test_labels[:40]
  loss, accuracy = core.make_evaluate(loss_fn, batch_size=16)(params, images, labels)
  logits = np.asarray(model.apply({"params": params}, images), np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nats = -np.take_along_axis(logp, labels[..., None], -1).mean()  # per predicted character
  np.testing.assert_allclose(loss, nats, rtol=1e-5)
  assert accuracy == pytest.approx(np.mean(logits.argmax(-1) == labels))  # next-character


def test_windows_gathered_on_a_device_are_the_hosts(cpu_devices):
  dataset = data.load(train.validate(tiny(algorithm="sgd")))
  index = np.array([[0, 5, 17], [dataset.num_train - 1, 3, 9]])
  host = dataset.take(index.reshape(-1))
  on_device = dataset.gather(jax.device_put(dataset.device_arrays()), jax.numpy.asarray(index))
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.asarray(on_device[key]).reshape(-1, 8), host[key])
  np.testing.assert_array_equal(host["label"][:, :-1], host["image"][:, 1:])  # shifted by one


def test_the_transformer_splits_megatron_style_and_equals_one_device(cpu_devices):
  config = train.validate(tiny(algorithm="sgd", width=32, num_heads=4))
  dataset, _, loss_fn, params = train.setup(config)
  specs = partitioning.specs(params)
  assert specs["block_0"]["attn"]["query"]["kernel"] == partitioning.P(None, partitioning.MODEL)
  assert specs["block_0"]["mlp"]["proj"]["kernel"] == partitioning.P(partitioning.MODEL, None)
  assert specs["wte"]["embedding"] == partitioning.P()
  rule = algorithms.create(config, loss_fn)
  mesh = steps.Mesh(None, rule, None, params, (1, 4))
  one = steps.Single(None, rule, None, params)
  sampler = data.Sampler(dataset, seed=0)
  for t in range(3):
    batch = sampler.next(config.batch_size)
    mesh.step(t, batch)
    one.step(t, batch)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    jax.device_get(mesh.state.params),
    jax.device_get(one.state.params),
  )


def test_the_transformers_defaults_are_nanogpts_and_a_flag_given_wins():
  config = train.validate(tiny(algorithm="diloco"))
  assert (config.optimizer, config.learning_rate, config.beta2, config.weight_decay) == (
    "adamw",
    1e-3,
    0.99,
    0.1,
  )
  assert (config.grad_clip, config.lr_schedule, config.min_learning_rate) == (
    1.0,
    "warmup_cosine",
    1e-4,
  )
  assert config.warmup_steps == 1  # 100 outlasts these 12 steps: a tenth of them
  assert (
    train.validate(dataclasses.replace(tiny(algorithm="diloco"), learning_rate=0.01)).learning_rate
    == 0.01
  )
  hogwild = train.validate(tiny(algorithm="hogwild"))
  assert (hogwild.optimizer, hogwild.lr_schedule) == ("sgd", "constant")


def test_generation_pads_its_window_without_changing_a_prediction(cpu_devices):
  """generate's right-padded fixed window gives what the unpadded growing window gives."""
  config = train.validate(tiny(algorithm="sgd"))
  _, model, _, params = train.setup(config)
  found = transformer.generate(model, params, [3, 1], 10, 0.0, jax.random.key(0))
  tokens = [3, 1]
  for _ in range(10):  # temperature 0: the most likely next token, from the last 8 unpadded
    window = np.asarray(tokens[-8:], np.int32)[None]
    tokens.append(int(np.argmax(model.apply({"params": params}, window)[0, -1])))
  assert found == tokens


SAMPLE = os.path.join(REPO, "experiments", "sample.py")


@pytest.fixture(scope="module")
def lm_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("lm") / "run"
  train.train_and_evaluate(tiny(algorithm="diloco", checkpoint_every=12), str(workdir))
  return workdir


def sample(*flags):
  return run_process([sys.executable, SAMPLE, *flags], timeout=120, cwd=REPO, env=child_env())


def test_sample_prints_the_prompt_and_what_the_run_generates(lm_workdir, tmp_path):
  image_run = tmp_path / "image"
  train.train_and_evaluate(Config(algorithm="sgd", model="mlp", steps=1), str(image_run))
  flags = [f"--workdir={lm_workdir}", "--length=30", "--temperature=0", "--prompt=ROMEO:"]
  finished = sample(*flags)
  (lm_workdir / reporting.PARAMS).rename(tmp_path / "params.npz")  # now from the checkpoint
  try:
    from_checkpoint, *refused = run_at_once(
      [
        [sys.executable, SAMPLE, *flags],
        [sys.executable, SAMPLE, f"--workdir={image_run}"],
        [sys.executable, SAMPLE, f"--workdir={tmp_path / 'none'}"],
        [sys.executable, SAMPLE, f"--workdir={lm_workdir}", "--temperature=-1"],
        [sys.executable, SAMPLE, f"--workdir={lm_workdir}", "--prompt=\u00e9t\u00e9"],
      ],
      timeout=120, cwd=REPO, env=child_env(),
    )  # fmt: skip
  finally:
    (tmp_path / "params.npz").rename(lm_workdir / reporting.PARAMS)
  assert finished.returncode == 0, finished.stderr[-2000:]
  text_out = finished.stdout.rstrip("\n")
  assert text_out.startswith("ROMEO:") and len(text_out) == len("ROMEO:") + 30
  assert from_checkpoint.stdout == finished.stdout  # the last checkpoint is the final weights
  says = ["not a language model", "holds no run", "--temperature", "--prompt"]
  for result, said in zip(refused, says, strict=True):
    assert result.returncode == 2 and said in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr

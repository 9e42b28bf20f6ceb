"""Streaming DiLoCo: `diloco` bitwise at one fragment, and each piece (fragments and their sync
times, the overlap, the merge, the per-fragment outer state, each quantizer) against a float64
NumPy reference of the algorithm as its module docstring writes it; its declared transfers;
its flags refused where they mean nothing."""

import jax
import ml_dtypes
import numpy as np
import optax
import pytest

from easgd_jax import models, quantize, train
from easgd_jax.algorithms import DiLoCo, StreamingDiLoCo
from easgd_jax.algorithms.streaming_diloco import fragments, layers
from easgd_jax.config import QUANTIZE, Config
from easgd_jax.errors import ConfigError

import reference
from helpers import IMAGE_SHAPE, NUM_CLASSES, random_batches, run_steps

REPLICAS = 2
ETA, OUTER_LR, OUTER_MOMENTUM = 0.1, 0.7, 0.9


def test_one_fragment_without_overlap_is_diloco_bitwise(problem, cpu_devices):
  loss_fn, params = problem
  batches = random_batches(7, seed=1, replicas=REPLICAS)  # syncs after steps 2 and 5
  inner = optax.adamw(0.01)
  diloco = run_steps(DiLoCo(loss_fn, tau=3, optimizer=inner), params, batches, REPLICAS).state
  rule = StreamingDiLoCo(loss_fn, tau=3, fragments=1, optimizer=inner)
  assert [rule.phase(t) for t in range(7)] == [0, 0, 1, 0, 0, 1, 0]
  streaming = run_steps(rule, params, batches, REPLICAS).state
  same = (diloco.center, diloco.local, diloco.opt_state, diloco.outer_state)
  ours = (streaming.center, streaming.local, streaming.opt_state, streaming.outer_state[0])
  assert jax.tree.all(jax.tree.map(np.array_equal, same, ours))


# --- the float64 reference ------------------------------------------------------------------

NARROW = {  # name -> (the type that travels, the scaled bound: None unscaled)
  "bf16": (ml_dtypes.bfloat16, None),
  "fp8": (ml_dtypes.float8_e4m3fn, 448.0),
  "int8": (np.int8, 127.0),
  "fp4": (ml_dtypes.float4_e2m1fn, 6.0),
}


def roundtrip_reference(x, name):
  """x cast to `name` with a float32 absmax scale per row (the last axis; a vector: one), and
  back to float64."""
  narrow, largest = NARROW[name]
  if largest is None:
    return x.astype(narrow).astype(np.float64)
  rows = x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(1, -1)
  absmax = np.abs(rows).max(axis=1, keepdims=True)
  scale = np.where(absmax > 0, absmax / largest, 1.0).astype(np.float32)
  scaled = np.clip(rows / scale, -largest, largest)
  if narrow is np.int8:
    scaled = np.round(scaled)
  return (scaled.astype(narrow).astype(np.float64) * scale).reshape(x.shape)


def streaming_reference(layers0, batches, tau, count, overlap, alpha, name):
  """Streaming DiLoCo over the MLP's layers (layer l in fragment l mod count), SGD inside:
  (W-bar, every W^i, the relative quantization error of each sync), each a list of layers."""
  center = [[x.copy() for x in layer] for layer in layers0]
  local = [[[x.copy() for x in layer] for layer in layers0] for _ in batches[0]]
  momentum = [[np.zeros_like(x) for x in layer] for layer in layers0]  # each layer its own
  in_flight, errors = {}, []
  owned = [
    [(n, k) for n in range(len(layers0)) if n % count == p for k in (0, 1)] for p in range(count)
  ]  # fragment p's (layer, W or b)

  def syncs(t, p):
    return t >= 0 and (t + 1) % tau == (p + 1) * tau // count % tau

  for t, step in enumerate(batches):
    for i, batch in enumerate(step):
      grads = reference.mlp_gradient(local[i], batch["image"], batch["label"])
      local[i] = [list(layer) for layer in reference.axpy(-ETA, grads, local[i])]
    for p in range(count):
      if syncs(t, p):
        deltas = [[center[n][k] - w[n][k] for n, k in owned[p]] for w in local]
        sent = [
          [d if name == "none" else roundtrip_reference(d, name) for d in ds] for ds in deltas
        ]
        lost = sum(
          np.sum((s - d) ** 2)
          for ss, ds in zip(sent, deltas, strict=True)
          for s, d in zip(ss, ds, strict=True)
        )
        errors.append(np.sqrt(lost / sum(np.sum(d**2) for ds in deltas for d in ds)))
        in_flight[p] = [np.mean(xs, axis=0) for xs in zip(*sent, strict=True)]
      if syncs(t - overlap, p):
        for (n, k), g in zip(owned[p], in_flight.pop(p), strict=True):
          momentum[n][k] = OUTER_MOMENTUM * momentum[n][k] + g  # Nesterov, as optax writes it
          center[n][k] = center[n][k] - OUTER_LR * (g + OUTER_MOMENTUM * momentum[n][k])
          for w in local:
            w[n][k] = alpha * w[n][k] + (1 - alpha) * center[n][k]
  return center, local, errors


@pytest.fixture(scope="module")
def three_layers():
  """A 3-layer MLP (hidden 7, 5): its loss and float64 weights."""
  from easgd_jax import core

  model = models.create("mlp", NUM_CLASSES, hidden=(7, 5))
  params = models.init_params(model, IMAGE_SHAPE, seed=4)
  return core.make_loss_fn(model), jax.tree.map(lambda x: x.astype(np.float64), params)


def run_against_reference(three_layers, steps, tau, count, overlap=0, alpha=0.0, name="none"):
  loss_fn, params = three_layers
  batches = random_batches(steps, seed=2, replicas=REPLICAS)
  batches = [[dict(b, image=b["image"].astype(np.float64)) for b in bs] for bs in batches]
  with jax.enable_x64(True):
    rule = StreamingDiLoCo(
      loss_fn,
      tau=tau,
      fragments=count,
      overlap_steps=overlap,
      merge_alpha=alpha,
      quantize=name,
      optimizer=optax.sgd(ETA),
      outer_learning_rate=OUTER_LR,
      outer_momentum=OUTER_MOMENTUM,
    )
    runner = run_steps(rule, params, batches, REPLICAS)
    found = jax.tree.map(lambda x: np.asarray(x, np.float64), runner.state)
    diagnostics = runner.diagnostics()  # the local engine's, for the rows
  center, local, errors = streaming_reference(
    reference.to_layers(params), batches, tau, count, overlap, alpha, name
  )
  close = dict(rtol=0, atol=1e-6)
  jax.tree.map(
    lambda a, e: np.testing.assert_allclose(a[0], e, **close),
    found.center,
    reference.from_layers(center),
  )
  for i, w in enumerate(local):
    jax.tree.map(
      lambda a, e, i=i: np.testing.assert_allclose(a[i], e, **close),
      found.local,
      reference.from_layers(w),
    )
  return found, errors, diagnostics


def test_per_fragment_outer_state_matches_the_reference(three_layers, cpu_devices):
  """Three fragments, each with its own outer momentum, stepped only when it lands."""
  run_against_reference(three_layers, steps=13, tau=6, count=3)  # each lands twice, at 1, 3, 5


def test_the_overlap_delays_each_outer_step_as_the_reference(three_layers, cpu_devices):
  run_against_reference(three_layers, steps=14, tau=6, count=2, overlap=2)


def test_the_merge_keeps_alpha_of_the_overlap_steps_as_the_reference(three_layers, cpu_devices):
  run_against_reference(three_layers, steps=14, tau=6, count=2, overlap=1, alpha=0.25)


def test_a_quantized_run_and_its_error_match_the_reference(three_layers, cpu_devices):
  found, errors, diagnostics = run_against_reference(
    three_layers, steps=9, tau=4, count=2, overlap=1, name="int8"
  )
  np.testing.assert_allclose(found.quantization_error[0], errors[-1], rtol=1e-6)
  assert diagnostics == {"quantization_error": pytest.approx(errors[-1], rel=1e-6)}
  assert 0 < errors[-1] < 0.02


# --- each quantizer -------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(NARROW))
def test_each_quantizer_is_its_numpy_reference(name):
  rng = np.random.default_rng(5)
  rows = rng.standard_normal((6, 5)) * np.logspace(-4, 1, 6)[:, None]  # each row its own range
  rows[2] = 0.0  # a zero row: scale 1, not 0 / 0
  tensors = [rows, rng.standard_normal(7) * 1e-3, rng.standard_normal((3, 2, 4, 5))]
  with jax.enable_x64(True):
    found = [np.asarray(quantize.roundtrip(x, name)) for x in tensors]
    q, scale = quantize.quantize(tensors[0], name)
    small = np.array([1e-3, -4e-4, 2.5e-4])  # an unscaled cast to e2m1 makes these 0
    assert np.all(np.asarray(quantize.roundtrip(small, name)) != 0)
  assert q.dtype == np.dtype(NARROW[name][0])
  assert scale is None or (scale.dtype == np.float32 and scale.shape == (6, 1))
  for x, y in zip(tensors, found, strict=True):
    np.testing.assert_allclose(y, roundtrip_reference(x, name), rtol=1e-6, atol=0)
    relative = np.linalg.norm(y - x) / np.linalg.norm(x)
    assert 0 < relative < {"bf16": 4e-3, "fp8": 0.07, "int8": 0.01, "fp4": 0.25}[name]


def test_the_formats_are_the_flags_choices_and_their_widths():
  assert tuple(quantize.FORMATS) == QUANTIZE
  # 4 x 5 values and 4 row scales; a vector: one scale
  assert [quantize.wire_bytes((4, 5), n) for n in QUANTIZE] == [80, 40, 36, 36, 26]
  assert quantize.wire_bytes((7,), "int8") == 7 + 4


# --- fragments, sync times, transfers -------------------------------------------------------


def test_layers_are_dealt_strided_into_fragments():
  gpt = {n: {} for n in ("wte", "wpe", "ln_f", *(f"block_{i}" for i in range(12)))}
  assert layers(gpt) == [["ln_f", "wpe", "wte"], *([f"block_{i}"] for i in range(12))]
  lenet = {n: {} for n in ("Dense_2", "Conv_1", "Dense_0", "Conv_0", "Dense_1")}
  assert layers(lenet) == [["Conv_0"], ["Conv_1"], ["Dense_0"], ["Dense_1"], ["Dense_2"]]
  assert fragments(lenet, 2) == [["Conv_0", "Dense_0", "Dense_2"], ["Conv_1", "Dense_1"]]
  assert fragments(gpt, 13)[0] == ["ln_f", "wpe", "wte"]
  with pytest.raises(ConfigError, match=r"--fragments=6 is more than the model's 5 layers"):
    fragments(lenet, 6)


@pytest.mark.parametrize("tau, count, overlap", [(1, 1, 0), (4, 1, 3), (6, 3, 1), (8, 4, 0)])
def test_each_fragment_syncs_and_lands_when_the_formula_says(problem, tau, count, overlap):
  loss_fn, _ = problem
  rule = StreamingDiLoCo(
    loss_fn, tau=tau, fragments=count, overlap_steps=overlap, learning_rate=0.1
  )
  assert len(rule.phases) == 1 + count * (2 if overlap else 1)
  for t in range(3 * tau):
    expected = 0
    for p in range(count):
      if (t + 1) % tau == (p + 1) * tau // count % tau:
        expected = 1 + p
      sent = t - overlap
      if overlap and sent >= 0 and (sent + 1) % tau == (p + 1) * tau // count % tau:
        expected = 1 + count + p
    assert rule.phase(t) == expected, t
  if count == 1 and not overlap:  # where diloco averages
    diloco = DiLoCo(loss_fn, tau=tau, learning_rate=0.1)
    assert [rule.phase(t) for t in range(3 * tau)] == [diloco.phase(t) for t in range(3 * tau)]


@pytest.mark.parametrize("name", ["none", "int8", "fp4"])
def test_a_sync_declares_its_fragments_share_at_the_wire_width(three_layers, name):
  loss_fn, params = three_layers
  rule = StreamingDiLoCo(
    loss_fn, tau=6, fragments=3, overlap_steps=1, quantize=name, learning_rate=0.1
  )
  rule.init(params)
  whole = 4.0 * sum(x.size for x in jax.tree.leaves(params))  # the float32 model
  bits, scaled = {"none": (32, False), "int8": (8, True), "fp4": (4, True)}[name]
  for t in range(12):
    found = rule.transfers(t, whole)
    if (t + 1) % 2:
      assert found == (), t
      continue
    (transfer,) = found
    layer = params[f"Dense_{((t + 1) // 2 - 1) % 3}"]  # fragment p: layer p
    kernel, bias = layer["kernel"], layer["bias"]
    expected = (kernel.size + bias.size) * bits / 8 + scaled * 4 * (kernel.shape[0] + 1)
    assert transfer.num_bytes == pytest.approx(expected, rel=1e-12) and transfer.overlap_steps == 1


# --- flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
  "overrides, message",
  [
    (dict(algorithm="easgd", fragments=1), "--fragments=1 applies to --algorithm=streaming"),
    (dict(algorithm="diloco", quantize="int8"), "--quantize=int8 applies"),
    (dict(algorithm="sync_sgd", overlap_steps=1), "--overlap_steps=1 applies"),
    (dict(algorithm="local_sgd", merge_alpha=0.5), "--merge_alpha=0.5 applies"),
    (dict(algorithm="streaming_diloco", tau=5), r"--tau=5 must be a multiple of --fragments=2"),
    (dict(algorithm="streaming_diloco", overlap_steps=5), r"--overlap_steps=5 must be below"),
    (dict(algorithm="streaming_diloco", merge_alpha=1.5), r"--merge_alpha must be in \[0, 1\]"),
    (dict(algorithm="streaming_diloco", quantize="fp16"), "--quantize=fp16 is unknown"),
    (dict(algorithm="streaming_diloco", fragments=0), "--fragments must be an integer >= 1"),
  ],
)
def test_its_flags_are_refused_where_they_mean_nothing(overrides, message):
  with pytest.raises(ConfigError, match=message):
    train.validate(Config(**overrides))


def test_its_defaults_fill_its_flags_only():
  config = train.validate(Config(algorithm="streaming_diloco", model="mlp"))
  assert (config.fragments, config.tau, config.optimizer, config.overlap_steps) == (
    2,
    10,
    "adamw",
    0,
  )
  assert train.validate(Config(algorithm="diloco")).fragments is None
  lm = train.validate(
    Config(algorithm="streaming_diloco", model="transformer", dataset="shakespeare")
  )
  assert (lm.fragments, lm.tau, lm.optimizer, lm.lr_schedule) == (2, 10, "adamw", "warmup_cosine")


# --- end to end -----------------------------------------------------------------------------


def test_it_learns_digits_and_reports_its_quantization_error(cpu_devices):
  """Two fragments, one overlap step, half merged, int8, on the simulated cluster (the local
  engine's rows: above): >= 0.9 test accuracy after 30 steps (0.94 at seed 0), and the error
  in its row."""
  config = Config(
    algorithm="streaming_diloco",
    model="mlp",
    num_devices=2,
    steps=30,
    eval_every=30,
    overlap_steps=1,
    merge_alpha=0.5,
    quantize="int8",
    engine="simulated",
    sim_compute_ms=1.0,
    sim_service_us=20.0,
    progress_every_s=0,
  )
  rows = train.train_and_evaluate(config)["history"]
  assert rows[-1]["test_accuracy"] >= 0.9
  assert all(0 < row["quantization_error"] < 0.02 for row in rows)  # int8: ~1/127 of a row's max


def test_the_cluster_clock_hides_an_overlapped_fragment_and_counts_quantized_bytes(cpu_devices):
  """What the rule declares reaches the clock: on a link slow enough that a fragment's transfer
  takes ~3 steps of compute, overlapping it by 3 steps hides most of its time, and fp4 sends
  about an eighth of the float32 bytes (plus a float32 scale per row)."""

  def clock(**fields):
    config = Config(
      algorithm="streaming_diloco", model="mlp", num_devices=2, fragments=2, tau=8, steps=16,
      eval_every=16, engine="simulated", sim_compute_ms=1.0, sim_service_us=20.0,
      sim_bandwidth_gbps=0.2, progress_every_s=0, **fields,
    )  # fmt: skip
    return train.train_and_evaluate(config)["final"]

  blocking, hidden = clock(), clock(overlap_steps=3)
  assert hidden["virtual_time_s"] < 0.75 * blocking["virtual_time_s"]
  fp4 = clock(quantize="fp4")
  assert 1 / 8 < fp4["bytes_sent"] / blocking["bytes_sent"] < 1 / 4

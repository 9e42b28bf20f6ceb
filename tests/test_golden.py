"""Golden values: every deterministic algorithm x engine pinned to its final weights and rows.

Captured before the one-rule redesign (algorithms as pure rules, engines that only interpret
them) from the code of that moment, with every flag that touches the arithmetic written out, so
that a later change of a default cannot move them. A refactor that changes one of these is a
bug until a note says why; regenerate only on purpose:

  WRITE_GOLDEN=1 python -m pytest -n0 tests/test_golden.py

Each entry holds the SHA-256 of the final parameters (params.npz, every array's bytes in name
order) and the metrics rows with the clock columns left out (wall time varies). Combinations
that are bitwise reproducible are compared bitwise; the others (`CLOSE`) to rtol 1e-6, as the
cross-engine tests compare them. The asynchronous runs on threads and Ray are not deterministic:
their check is the replay of the applied-update record (tests/test_async.py, tests/test_ray.py).
"""

import hashlib
import json
import os

import numpy as np
import pytest

from easgd_jax import reporting, train
from easgd_jax.config import Config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "golden.json")
WRITE = os.environ.get("WRITE_GOLDEN") == "1"

# Every field that touches the arithmetic, written out (the defaults may change).
WRITTEN_OUT = dict(
  dataset="digits",
  model="mlp",
  num_devices=4,
  batch_size=16,
  learning_rate=0.05,
  rho=1.0,
  tau=1,
  momentum=0.0,
  optimizer="sgd",
  lr_schedule="constant",
  warmup_steps=0,
  weight_decay=1e-4,
  outer_learning_rate=0.7,
  outer_momentum=0.9,
  steps=40,
  eval_every=20,
  checkpoint_every=20,
  seed=0,
  model_parallel=1,
)
SIMULATED = dict(
  engine="simulated",
  sim_compute_ms=1.0,
  sim_latency_us=10.0,
  sim_bandwidth_gbps=96.0,
  sim_service_us=50.0,
  sim_jitter=0.5,
  sim_stragglers=1,
  sim_straggler_slowdown=4.0,
)
STEP_DRIVEN = {
  "sgd": dict(algorithm="sgd"),
  "sgd_adamw_warmup_cosine": dict(
    algorithm="sgd",
    optimizer="adamw",
    learning_rate=2e-3,
    lr_schedule="warmup_cosine",
    warmup_steps=5,
    decay_steps=40,
  ),
  "sync_sgd": dict(algorithm="sync_sgd"),
  "sync_easgd_tau2": dict(algorithm="sync_easgd", tau=2),
  "sync_eamsgd_tau2": dict(algorithm="sync_easgd", tau=2, momentum=0.9, optimizer="nesterov"),
  "local_sgd_tau2": dict(algorithm="local_sgd", tau=2),
  "diloco_tau3": dict(algorithm="diloco", tau=3, optimizer="adamw", learning_rate=2e-3),
  "easgd_tau2": dict(algorithm="easgd", tau=2),
  "eamsgd_tau2": dict(algorithm="easgd", tau=2, momentum=0.9, optimizer="nesterov"),
}
LOCAL_ONLY = {
  "sgd_model_parallel2": dict(algorithm="sgd", model_parallel=2),
  "sync_sgd_model_parallel2": dict(algorithm="sync_sgd", model_parallel=2),
}
ASYNC = {
  "async_sgd": dict(algorithm="async_sgd"),
  "hogwild": dict(algorithm="hogwild"),
  "async_easgd_tau2": dict(algorithm="async_easgd", tau=2),
  "async_eamsgd_tau2": dict(algorithm="async_easgd", tau=2, momentum=0.9, optimizer="nesterov"),
  "hogwild_easgd_tau2": dict(algorithm="hogwild_easgd", tau=2),
  "downpour_tau3": dict(algorithm="downpour", tau=3),
  "mdownpour_tau2": dict(algorithm="downpour", tau=2, momentum=0.9, optimizer="nesterov"),
}

CASES = {
  **{f"local/{k}": v for k, v in {**STEP_DRIVEN, **LOCAL_ONLY}.items()},
  **{f"simulated/{k}": {**v, **SIMULATED} for k, v in {**STEP_DRIVEN, **ASYNC}.items()},
}
RAY = {"ray/easgd_tau2": dict(STEP_DRIVEN["easgd_tau2"], engine="ray")}  # tests/test_ray.py
# Bitwise reproducible on their engine, except these (compared to rtol 1e-6):
CLOSE = frozenset()
CLOCK = ("wall_time_s",)


def config(fields):
  return Config(**{**WRITTEN_OUT, **fields})


def fingerprint(workdir, summary):
  params = reporting.load_params(os.path.join(workdir, reporting.PARAMS))
  digest = hashlib.sha256()
  for name in sorted(params):
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(params[name]).tobytes())
  rows = [{k: v for k, v in row.items() if k not in CLOCK} for row in summary["history"]]
  flat = {name: params[name].ravel()[:4].tolist() for name in sorted(params)}
  return {"params_sha256": digest.hexdigest(), "rows": rows, "params_head": flat}


def run_case(name, tmp_path, extra=None):
  workdir = str(tmp_path / name.replace("/", "_"))
  fields = {**CASES, **RAY}[name]
  summary = train.train_and_evaluate(config({**fields, **(extra or {})}), workdir)
  return fingerprint(workdir, summary)


def golden():
  if not os.path.exists(FIXTURE):
    return {}
  with open(FIXTURE) as f:
    return json.load(f)


def check(name, found):
  if WRITE:
    saved = golden()
    saved[name] = found
    os.makedirs(os.path.dirname(FIXTURE), exist_ok=True)
    with open(FIXTURE, "w") as f:
      json.dump(saved, f, indent=1, sort_keys=True)
      f.write("\n")
    return
  expected = golden()[name]
  if name in CLOSE:
    for a, b in zip(found["rows"], expected["rows"], strict=True):
      for key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=f"{name} {key}")
    return
  assert found["rows"] == expected["rows"], (
    f"{name}: the metrics rows moved; a refactor that changes them is a bug until a note says why"
  )
  assert found["params_sha256"] == expected["params_sha256"], (
    f"{name}: the final weights moved (first values {found['params_head']} against "
    f"{expected['params_head']}); a refactor that changes them is a bug until a note says why"
  )


@pytest.mark.parametrize("name", list(CASES))
def test_a_deterministic_run_keeps_its_golden_values(tmp_path, cpu_devices, name):
  check(name, run_case(name, tmp_path))

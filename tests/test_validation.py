"""Every algorithm's constructor rejects a bad hyperparameter with a ValueError naming it.

Config.validate catches these for run.py; the constructors check again for notebooks and scripts,
so `tau=0` fails at once with a message instead of a ZeroDivisionError inside a step.
"""

import inspect
import math
import re

import numpy as np
import pytest

from easgd_jax import algorithms, core
from easgd_jax.algorithms import (
  SGD,
  AsyncDiLoCo,
  AsyncEASGD,
  AsyncSGD,
  DiLoCo,
  Downpour,
  Hogwild,
  HogwildEASGD,
  LocalSGD,
  RoundRobinEASGD,
  StreamingDiLoCo,
  SyncEASGD,
  SyncSGD,
)


def loss_fn(params, batch):
  raise AssertionError("a constructor only builds the step; it never calls the loss")


# Valid settings of every required argument; the tests change one at a time.
VALID = {
  SGD: dict(learning_rate=0.1),
  SyncSGD: dict(learning_rate=0.1),
  SyncEASGD: dict(learning_rate=0.1, rho=1.0),
  RoundRobinEASGD: dict(learning_rate=0.1, rho=1.0),
  AsyncEASGD: dict(learning_rate=0.1, rho=1.0),
  HogwildEASGD: dict(learning_rate=0.1, rho=1.0),
  AsyncSGD: dict(learning_rate=0.1),
  Hogwild: dict(learning_rate=0.1),
  LocalSGD: dict(learning_rate=0.1),
  DiLoCo: dict(learning_rate=0.001),
  StreamingDiLoCo: dict(learning_rate=0.001),
  Downpour: dict(learning_rate=0.1),
  AsyncDiLoCo: dict(learning_rate=0.001),
}

BAD = [
  ("learning_rate", 0.0),
  ("learning_rate", -0.1),
  ("learning_rate", math.nan),
  ("learning_rate", math.inf),
  ("learning_rate", "0.1"),
  ("momentum", 1.0),
  ("momentum", -0.1),
  ("momentum", math.nan),
  ("rho", -1.0),
  ("rho", math.nan),
  ("rho", math.inf),
  ("alpha", math.inf),
  ("alpha", -0.1),
  ("alpha", math.nan),
  ("tau", 0),
  ("tau", -1),
  ("tau", 1.5),
  ("outer_delay", 0),
  ("outer_delay", 2.0),
  ("num_workers", 0),
  ("num_workers", 2.0),
  ("num_devices", 0),
  ("data_parallel", 0),
  ("model_parallel", 0),
]


def accepts(algorithm, name):
  return name in inspect.signature(algorithm).parameters


@pytest.mark.parametrize(
  "algorithm, name, value",
  [
    pytest.param(algorithm, name, value, id=f"{algorithm.__name__}-{name}={value!r}")
    for algorithm in VALID
    for name, value in BAD
    if accepts(algorithm, name)
  ],
)
def test_a_bad_hyperparameter_is_a_value_error_naming_it(algorithm, name, value):
  with pytest.raises(ValueError, match=rf"^{name}\b.* must .*\(got {re.escape(repr(value))}\)$"):
    algorithm(loss_fn, **{**VALID[algorithm], name: value})


@pytest.mark.parametrize("algorithm", list(VALID), ids=lambda a: a.__name__)
def test_the_edges_of_the_valid_ranges_are_accepted(algorithm, cpu_devices):
  edges = dict(momentum=0.0, rho=0.0, tau=1, num_workers=1, num_devices=1, data_parallel=1)
  edges["outer_delay"] = 1
  kwargs = {k: v for k, v in edges.items() if accepts(algorithm, k)}
  algorithm(loss_fn, **{**VALID[algorithm], **kwargs})
  numpy_scalars = {"learning_rate": np.float32(0.1)}  # what a sweep over np.linspace passes
  if accepts(algorithm, "momentum"):
    numpy_scalars["momentum"] = np.float64(0.99)
  if accepts(algorithm, "tau"):
    numpy_scalars["tau"] = np.int64(3)
  algorithm(loss_fn, **{**VALID[algorithm], **numpy_scalars})


def test_every_algorithm_is_checked():
  constructors = set(algorithms.REGISTRY.values())
  checked = {c for c in constructors if inspect.isclass(c) and accepts(c, "learning_rate")}
  assert checked == set(VALID)


def test_check_hyperparameters_names_the_first_bad_argument():
  core.check_hyperparameters(learning_rate=0.1, momentum=0.5, rho=0.0, tau=1, num_workers=1)
  with pytest.raises(ValueError, match=r"^tau must be an integer >= 1 \(got 0\)$"):
    core.check_hyperparameters(learning_rate=0.1, tau=0)
  with pytest.raises(ValueError, match=r"^num_workers must be an integer >= 1 \(got True\)$"):
    core.check_hyperparameters(learning_rate=0.1, num_workers=True)

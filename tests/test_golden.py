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

import pytest

import helpers


@pytest.mark.parametrize("name", list(helpers.GOLDEN_CASES))
def test_a_deterministic_run_keeps_its_golden_values(tmp_path, cpu_devices, name):
  helpers.golden_check(name, helpers.golden_run(name, tmp_path))

"""Eight emulated CPU devices for every test; must run before jax is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8"]
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def cpu_devices():
  devices = jax.devices()
  assert len(devices) >= 8, "tests expect 8 emulated devices (see tests/conftest.py)"
  return devices

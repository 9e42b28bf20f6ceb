"""Every notebook runs top to bottom (outputs are stripped in git, so this is their only check)."""

import asyncio
import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from helpers import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.fixture(scope="module")
def executed():
  """Every notebook executed, all at once (each in a kernel of its own): {path: error or None}.

  A kernel spends much of its time on one core (starting, importing, compiling), so the
  notebooks run side by side on a machine with two cores or more take less time than in turn.
  """

  async def execute(path):
    client = NotebookClient(
      nbformat.read(path, as_version=4),
      timeout=600,
      kernel_name="python3",
      resources={"metadata": {"path": REPO}},
    )
    try:
      await client.async_execute()
    except Exception as error:  # raised again by the notebook's own test
      return error
    return None

  async def execute_all():
    return await asyncio.gather(*(execute(path) for path in NOTEBOOKS))

  env_before = os.environ.pop("XLA_FLAGS", None)  # the notebook sets its own device count
  os.environ["EASGD_JAX_QUICK"] = "1"  # a notebook that trains for minutes takes a few steps
  try:
    errors = asyncio.run(execute_all())
  finally:
    os.environ.pop("EASGD_JAX_QUICK")
    if env_before is not None:
      os.environ["XLA_FLAGS"] = env_before
  return dict(zip(NOTEBOOKS, errors, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(executed, path):
  notebook = nbformat.read(path, as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
    "commit notebooks with outputs stripped"
  )
  if executed[path] is not None:
    raise executed[path]

"""Every notebook runs top to bottom (outputs are stripped in git, so this is their only check)."""

import glob
import os

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))


def test_there_are_notebooks():
  assert NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_executes(path):
  notebook = nbformat.read(path, as_version=4)
  assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), (
    "commit notebooks with outputs stripped"
  )
  env_before = os.environ.pop("XLA_FLAGS", None)  # the notebook sets its own device count
  try:
    NotebookClient(
      notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}
    ).execute()
  finally:
    if env_before is not None:
      os.environ["XLA_FLAGS"] = env_before

"""The library's layout: its import graph has no circle and no arrow back up a layer, no file is
long, and the engines know no algorithm (they read its declared facts only).

The import graph comes from the source itself (every `import` and `from ... import`, those
inside functions too), so a lazy import cannot hide a circle.
"""

import ast
import os
import re

import pytest

from easgd_jax.algorithms import REGISTRY

from helpers import REPO

LIBRARY = os.path.join(REPO, "easgd_jax")
# Top to bottom; a module may import its own layer (without a circle) or any layer below.
LAYERS = (
  ("cli", "study"),
  ("train", "trainer", "resume", "failures"),
  ("engines",),
  ("algorithms",),
  ("elastic", "optimizers", "core"),
  ("data", "models", "devices", "partitioning", "checkpoints", "reporting", "config", "workdir"),
  ("errors", "collectives", "schedule", "text", "transformer", "quantize", "network"),
)
MAX_LINES = 400
# The library may not grow but by what a feature needs: each feature's lines, named. The one-rule
# redesign kept within the 7,679 lines the library had before it.
BUDGET = {
  "the library before the one-rule redesign": 7_679,
  "the language-model workload (transformer, text, TextDataset, Megatron rules, defaults)": 560,
  "StepRule.transfers, the facts the cluster clock costs": 25,
  "async_diloco (Delayed Nesterov), and exchange periods from measured speeds on every engine": 334,
  "streaming_diloco: fragments, overlap, merge, quantize.py, Rule.diagnostics in the rows": 393,
  "defaults that train: the not-learning warning, the settings in force on the start line": 52,
  "sampling a language model: transformer.generate, reporting.load_params(like=)": 30,
  "the cluster clock: overlap, node and shared links, payload bytes, peak bandwidth, recost": 241,
  "issue 23's reliability: network surface, private Ray, no mixed runs, damage, full disks": 454,
  "step-driven rules on Ray (replica actors, a reducer, a quorum per round), mesh workers": 791,
  "studies judged by validation loss: loss columns and plots, the warm-up share": 101,
  "data x model mesh workers, the inner all-reduce's cost, chunked loops, rows in the LM": 135,
  "a Ray replica lost before it started (its node gone) is placed again, not restarted": 19,
  "a failed checkpoint's temporary folder removed again while writes in flight refill it": 11,
  "a stop just after a point adds no second row or save; Ray answers taken as they finish": 7,
  "--inject_failure on Ray SIGKILLs the worker's own process, as an outside kill would": 1,
  "a signal in a run's last steps completes the run and still stops its caller": 23,
  "study plots a panel per cluster; a relaunch with another --target_loss retimes the table": 18,
  "downpour's own SGD rate on the transformer, with its tuning": 3,
  "LeNet's convolutions on small maps as one matmul each (SmallMapConv)": 57,
  "a stop with no workdir (Interrupted); the worker threads' locked master in host memory": 94,
  "worker threads wait for every worker's compiling first iteration; a gathered spread kernel": 10,
  "the worker threads' CPU calls run on their caller's thread (no dispatch queue)": 25,
  "worker threads on CPU devices: at most one per core, workers taking turns; --worker_threads": 38,
}
BUDGET_LINES = sum(BUDGET.values())


def modules():
  """{module name: path} of every module of the library."""
  found = {}
  for folder, _, files in os.walk(LIBRARY):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        parts = os.path.relpath(path, REPO)[: -len(".py")].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        found[".".join(parts)] = path
  return found


def imports(path, name, known):
  """The library modules `path` (module `name`) imports."""
  tree = ast.parse(open(path).read())
  package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
      # `from package import module` depends on that module (as pydeps draws it), and
      # `from module import name` on the module.
      targets = [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names
      ]
    else:
      continue
    for target in targets:
      while target and target not in known:  # `from easgd_jax import x`: x may be a module
        target = target.rpartition(".")[0]
      if target and target != name and target != "easgd_jax":
        found.add(target)
  return found


def graph():
  known = modules()
  return {name: imports(path, name, known) for name, path in known.items()}


def layer(name):
  top = name.split(".")[1] if "." in name else name
  for index, members in enumerate(LAYERS):
    if top in members:
      return index
  raise AssertionError(f"{name} is in no layer: add it to LAYERS")


def test_the_import_graph_has_no_circle():
  edges, state, circles = graph(), {}, []

  def visit(node, path):
    state[node] = "open"
    for target in sorted(edges[node]):
      if state.get(target) == "open":
        circles.append(path[path.index(target) :] + [target])
      elif target not in state:
        visit(target, [*path, target])
    state[node] = "done"

  for node in sorted(edges):
    if node not in state:
      visit(node, [node])
  assert not circles, f"import circles: {circles}"


def test_no_module_imports_a_layer_above_its_own():
  upward = [
    (name, target)
    for name, targets in graph().items()
    if name != "easgd_jax"
    for target in targets
    if layer(target) < layer(name)
  ]
  assert not upward, f"imports back up a layer: {upward}"


def test_no_file_is_long_and_the_library_does_not_grow():
  lengths = {path: len(open(path).read().splitlines()) for path in modules().values()}
  long = {os.path.relpath(p, REPO): n for p, n in lengths.items() if n > MAX_LINES}
  assert not long, f"files over {MAX_LINES} lines: {long}"
  assert sum(lengths.values()) <= BUDGET_LINES, sum(lengths.values())


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_the_engines_know_no_algorithm(name):
  """No engine file names an algorithm, imports one or asks its type: it reads facts."""
  pattern = re.compile(rf"\b{re.escape(name)}\b", re.IGNORECASE)
  for path in modules().values():
    if f"{os.sep}engines{os.sep}" not in path and not path.endswith(f"engines{os.sep}__init__.py"):
      continue
    source = open(path).read()
    assert not pattern.search(source), f"{os.path.relpath(path, REPO)} names {name}"
    assert not re.search(r"hasattr\((self\.)?(rule|algorithm)", source), path
    assert not re.search(r"isinstance\((self\.)?(rule|algorithm)", source), path
    for target in imports(path, "", modules()):
      assert not target.startswith("easgd_jax.algorithms.") or target.endswith(".base"), (
        f"{os.path.relpath(path, REPO)} imports {target}"
      )

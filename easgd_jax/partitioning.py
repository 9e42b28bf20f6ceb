"""Model parallelism: which slice of each layer lives on which device of the (data, model) mesh.

The devices form a mesh of shape (data = P / M, model = M). Parameters are split across the
`model` axis and replicated across `data`; batches are split across `data`:

  Conv                      kernel P(None, None, None, model), bias P(model)  (output channels)
  Dense pair, first (a)     kernel P(None, model),             bias P(model)  (column-wise)
  Dense pair, second (b)    kernel P(model, None),             bias replicated (row-wise)
  an unpaired last Dense    replicated (the classifier: 10 outputs do not split evenly)

Dense layers pair up in order (Dense_0 with Dense_1, Dense_2 with Dense_3, ...): the Megatron
pattern. Device k computes h_k = relu(x @ a.kernel[:, k] + a.bias[k]) with no communication (x is
whole on every device), then the partial product h_k @ b.kernel[k, :]; one all-reduce sums the
partials. A convolution split by output channels computes its own channels; the next layer needs
them all, so they are gathered there, and nowhere else.

How: sharding annotations under `jit` (GSPMD), not `shard_map`. The networks are written once, in
models.py, and the very same Flax code runs on one device or on M: we only say where every
parameter lives (`specs`), and XLA's SPMD partitioner gives each device the matching slice of the
layer math and inserts exactly the collectives above. Measured in the compiled training step
(tests/test_model_parallel.py counts them): the MLP needs one all-reduce per step (its one pair;
the backward pass needs none, because the input's gradient is never used), LeNet and CifarCNN two
all-gathers (one per convolution) and three all-reduces (the pair, and the backward pass into the
second convolution and into the pair's input). `shard_map` would mean writing every layer's
per-device math and its collectives by hand: a second copy of each model to keep in step with
models.py.
"""

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easgd_jax.errors import ConfigError

DATA, MODEL = "data", "model"  # the mesh's axis names
# The transformer (transformer.py), Megatron's way: in attention the query, key and value
# kernels split by columns (whole heads per device: each head is a contiguous column block) and
# the output projection by rows; in the MLP the first kernel by columns, the second by rows.
# One all-reduce after each pair; embeddings and LayerNorm scales stay whole.
TRANSFORMER = {
  ("attn", "query"): P(None, MODEL),
  ("attn", "key"): P(None, MODEL),
  ("attn", "value"): P(None, MODEL),
  ("attn", "proj"): P(MODEL, None),
  ("mlp", "fc"): P(None, MODEL),
  ("mlp", "proj"): P(MODEL, None),
}


def _index(name):
  return int(name.rsplit("_", 1)[1])


def _name(key):
  return str(getattr(key, "key", getattr(key, "name", key)))


def specs(params):
  """A PartitionSpec for every parameter, by the rules in the module docstring (a pytree like
  `params`)."""
  if any(name.startswith("block_") for name in params):  # the transformer
    return jax.tree_util.tree_map_with_path(
      lambda path, _: TRANSFORMER.get(tuple(_name(k) for k in path[-3:-1]), P()), params
    )
  dense = sorted((n for n in params if n.startswith("Dense_")), key=_index)
  paired = len(dense) - len(dense) % 2
  result = {}
  for name, layer in params.items():
    if name.startswith("Conv_"):
      result[name] = {"kernel": P(None, None, None, MODEL), "bias": P(MODEL)}
    elif name in dense[:paired:2]:  # first of a pair: column-wise
      result[name] = {"kernel": P(None, MODEL), "bias": P(MODEL)}
    elif name in dense[1:paired:2]:  # second of a pair: row-wise
      result[name] = {"kernel": P(MODEL, None), "bias": P()}
    else:
      result[name] = {key: P() for key in layer}
  return result


def _leaves(params):
  """[(name, array, spec)] of every parameter."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  spec_leaves = jax.tree.leaves(specs(params), is_leaf=lambda x: isinstance(x, P))
  return [
    ("/".join(_name(k) for k in path), array, spec)
    for (path, array), spec in zip(flat, spec_leaves, strict=True)
  ]


def check_divisible(params, model_parallel):
  """Raise ConfigError at start-up if a split layer's width is not a multiple of M."""
  for name, array, partition in _leaves(params):
    for axis, axis_name in enumerate(partition):
      width = array.shape[axis]
      if axis_name == MODEL and width % model_parallel:
        raise ConfigError(
          f"--model_parallel={model_parallel} does not divide layer {name} (it is "
          f"{'x'.join(map(str, array.shape))}, split along its size-{width} axis); "
          f"choose a --model_parallel that divides every layer width"
        )


def shardings(params, mesh, stacked=None):
  """NamedSharding of every parameter on `mesh` (replicated over its data axis); with `stacked`
  (a mesh axis), of a leading axis of copies split over that axis (workers that are meshes)."""
  lead = () if stacked is None else (stacked,)
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, P(*lead, *spec)),
    specs(params),
    is_leaf=lambda x: isinstance(x, P),
  )


def state_shardings(init, params, placed, fallback):
  """Where init(params)'s leaves go when the parameters are `placed` (a pytree of shardings, the
  params possibly host arrays): the state follows W's layout (XLA's choice for each leaf), its
  other leaves (step counts) `fallback`."""
  structs = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, placed
  )
  found = jax.jit(init).lower(structs).compile().output_shardings
  mesh = fallback.mesh
  on_mesh = lambda s: isinstance(s, NamedSharding) and s.mesh == mesh  # noqa: E731
  return jax.tree.map(lambda s: s if on_mesh(s) else fallback, found)


def batch_sharding(mesh):
  return NamedSharding(mesh, P(DATA))


def replicated(mesh):
  return NamedSharding(mesh, P())


def layout(params, model_parallel):
  """Rows (parameter, full shape, spec, shape on each device) for the docs and notebooks."""
  rows = []
  kernel_first = lambda leaf: (leaf[0].rpartition("/")[0], not leaf[0].endswith("kernel"))  # noqa: E731
  for name, array, partition in sorted(_leaves(params), key=kernel_first):
    shape = array.shape
    local = [
      size // model_parallel if i < len(partition) and partition[i] == MODEL else size
      for i, size in enumerate(shape)
    ]
    rows.append((name, tuple(shape), str(partition), tuple(local)))
  return rows


def layout_markdown(params, model_parallel):
  """`layout` as a Markdown table."""
  lines = [
    f"| parameter | shape | PartitionSpec | on each of the {model_parallel} model devices |",
    "| --- | --- | --- | --- |",
  ]
  for name, shape, spec, local in layout(params, model_parallel):
    lines.append(f"| `{name}` | {shape} | `{spec}` | {local} |")
  return "\n".join(lines)

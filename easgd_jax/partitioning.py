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

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from easgd_jax.errors import ConfigError

DATA, MODEL = "data", "model"  # the mesh's axis names


def _index(name):
  return int(name.rsplit("_", 1)[1])


def specs(params):
  """A PartitionSpec for every parameter, by the rules in the module docstring."""
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


def check_divisible(params, model_parallel):
  """Raise ConfigError at start-up if a split layer's width is not a multiple of M."""
  for name, spec in specs(params).items():
    for key, partition in spec.items():
      for axis, axis_name in enumerate(partition):
        width = params[name][key].shape[axis]
        if axis_name == MODEL and width % model_parallel:
          raise ConfigError(
            f"--model_parallel={model_parallel} does not divide layer {name} ({key} is "
            f"{'x'.join(map(str, params[name][key].shape))}, split along its size-{width} axis); "
            f"choose a --model_parallel that divides every layer width"
          )


def shardings(params, mesh):
  """NamedSharding of every parameter on `mesh` (replicated over its data axis)."""
  return {
    name: {key: NamedSharding(mesh, spec) for key, spec in layer.items()}
    for name, layer in specs(params).items()
  }


def batch_sharding(mesh):
  return NamedSharding(mesh, P(DATA))


def replicated(mesh):
  return NamedSharding(mesh, P())


def layout(params, model_parallel):
  """Rows (parameter, full shape, spec, shape on each device) for the docs and notebooks."""
  rows = []
  for name, spec in specs(params).items():
    for key, partition in sorted(spec.items(), reverse=True):  # kernel, then bias
      shape = params[name][key].shape
      local = [
        size // model_parallel if i < len(partition) and partition[i] == MODEL else size
        for i, size in enumerate(shape)
      ]
      rows.append((f"{name}/{key}", tuple(shape), str(partition), tuple(local)))
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

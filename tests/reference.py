"""Independent NumPy references for the update rules, written from the equations alone.

Nothing here imports easgd_jax: the MLP forward/backward pass and every update rule are
re-derived by hand in float64, so a bug in the library cannot hide in its own reference.
"""

import numpy as np


def to_layers(params):
  """Flax MLP params {'Dense_0': {'kernel', 'bias'}, ...} -> [(W, b), ...] in float64."""
  names = sorted(params, key=lambda name: int(name.split("_")[1]))
  return [
    (np.array(params[n]["kernel"], np.float64), np.array(params[n]["bias"], np.float64))
    for n in names
  ]


def from_layers(layers):
  return {f"Dense_{i}": {"kernel": w, "bias": b} for i, (w, b) in enumerate(layers)}


def mlp_gradient(layers, images, labels):
  """Delta W of the mean softmax cross-entropy of a ReLU MLP, by hand-written backprop."""
  h = images.reshape(len(images), -1).astype(np.float64)
  inputs, pre_activations = [], []
  for i, (w, b) in enumerate(layers):
    inputs.append(h)
    z = h @ w + b
    pre_activations.append(z)
    h = np.maximum(z, 0) if i < len(layers) - 1 else z
  logits = h - h.max(axis=1, keepdims=True)
  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  delta = probs
  delta[np.arange(len(labels)), labels] -= 1
  delta /= len(labels)
  grads = [None] * len(layers)
  for i in reversed(range(len(layers))):
    grads[i] = (inputs[i].T @ delta, delta.sum(axis=0))
    if i:
      delta = (delta @ layers[i][0].T) * (pre_activations[i - 1] > 0)
  return grads


def axpy(a, xs, ys):
  """a * x + y, layer by layer."""
  return [(a * wx + wy, a * bx + by) for (wx, bx), (wy, by) in zip(xs, ys, strict=True)]


def sgd(layers, batches, eta):
  """W <- W - eta * Delta W over the batches in order."""
  for batch in batches:
    layers = axpy(-eta, mlp_gradient(layers, batch["image"], batch["label"]), layers)
  return layers


def round_robin_easgd(layers, batches, num_workers, eta, rho, tau):
  """Algorithm 1: iteration t uses worker j = t mod G; exchange on the worker's steps 0, tau, ...

  Eq. (1) W^j <- W^j - eta * (Delta W^j + rho * (W^j - center))
  Eq. (2) center <- center + eta * rho * (W^j - center), with W^j before its update.
  Returns (center, locals).
  """
  center = layers
  local = [layers] * num_workers
  for t, batch in enumerate(batches):
    j = t % num_workers
    grad = mlp_gradient(local[j], batch["image"], batch["label"])
    if (t // num_workers) % tau == 0:
      difference = axpy(-1.0, center, local[j])  # W^j - center
      new_local = axpy(-eta, axpy(rho, difference, grad), local[j])
      center = axpy(eta * rho, difference, center)
      local[j] = new_local
    else:
      local[j] = axpy(-eta, grad, local[j])
  return center, local

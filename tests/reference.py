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


def zeros_like(layers):
  return [(np.zeros_like(w), np.zeros_like(b)) for w, b in layers]


def local_step(w, v, grad, eta, delta):
  """Nesterov momentum with W held at the look-ahead point (Sutskever et al.'s form, shifted):

  v <- delta * v - eta * Delta W,  W <- W + delta * v - eta * Delta W.
  Zhang et al. write v <- delta v - eta grad f(x + delta v), x <- x + v; with W = x + delta v
  these are the same iterates. delta = 0 is plain W <- W - eta * Delta W.
  """
  v = axpy(-eta, grad, [(delta * vw, delta * vb) for vw, vb in v])
  return axpy(-eta, grad, axpy(delta, v, w)), v


def round_robin_easgd(layers, batches, num_workers, eta, rho, tau, delta=0.0):
  """Algorithm 1: iteration t uses worker j = t mod G; exchange on the worker's steps 0, tau, ...

  Eq. (1) W^j <- W^j - eta * (Delta W^j + rho * (W^j - center))
  Eq. (2) center <- center + eta * rho * (W^j - center), with W^j before its update.
  Returns (center, locals).
  """
  center = layers
  local = [layers] * num_workers
  velocity = [zeros_like(layers)] * num_workers
  for t, batch in enumerate(batches):
    j = t % num_workers
    grad = mlp_gradient(local[j], batch["image"], batch["label"])
    new_local, velocity[j] = local_step(local[j], velocity[j], grad, eta, delta)
    if (t // num_workers) % tau == 0:
      difference = axpy(-1.0, center, local[j])  # W^j - center
      new_local = axpy(-eta * rho, difference, new_local)
      center = axpy(eta * rho, difference, center)
    local[j] = new_local
  return center, local


def sync_easgd(layers, steps, eta, rho, tau, delta=0.0):
  """Synchronous EASGD: `steps` is a list over iterations of P batches, one per worker.

  On iterations 0, tau, 2 tau, ... every worker applies Eq. (1) and the center applies Eq. (2)
  with the sum over all P workers; otherwise every worker takes a local step.
  """
  workers = len(steps[0])
  center, local = layers, [layers] * workers
  velocity = [zeros_like(layers)] * workers
  for t, batches in enumerate(steps):
    differences = [axpy(-1.0, center, w) for w in local]
    for i, batch in enumerate(batches):
      grad = mlp_gradient(local[i], batch["image"], batch["label"])
      local[i], velocity[i] = local_step(local[i], velocity[i], grad, eta, delta)
      if t % tau == 0:
        local[i] = axpy(-eta * rho, differences[i], local[i])
    if t % tau == 0:
      for difference in differences:
        center = axpy(eta * rho, difference, center)
  return center, local

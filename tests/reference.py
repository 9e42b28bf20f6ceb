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


def scale(a, xs):
  """a * x, layer by layer."""
  return [(a * w, a * b) for w, b in xs]


def add(*trees):
  """The layer-by-layer sum of `trees`."""
  return [
    (sum(w for w, _ in layer), sum(b for _, b in layer)) for layer in zip(*trees, strict=True)
  ]


def local_step(w, v, grad, eta, delta):
  """One Nesterov step with no elastic force, held at the look-ahead point W = x + delta * v:

  v <- delta * v - eta * Delta W,  W <- W + delta * v - eta * Delta W.
  Zhang et al. write v <- delta v - eta grad f(x + delta v), x <- x + v; with W = x + delta v
  these are the same iterates. delta = 0 is plain W <- W - eta * Delta W. (Only for local steps:
  the elastic force acts on x, not on W; see `eamsgd_step`.)
  """
  v = axpy(-eta, grad, [(delta * vw, delta * vb) for vw, vb in v])
  return axpy(-eta, grad, axpy(delta, v, w)), v


def lookahead(x, v, delta):
  """W = x + delta * v, the point where the gradient is taken (and the library stores)."""
  return axpy(delta, v, x)


def eamsgd_step(x, v, batch, eta, delta, alpha=0.0, center=None):
  """One own step of an EAMSGD worker, Zhang et al. (2015) Algorithm 2, in x and v:

    if exchanging (center given):  x^i <- x^i - alpha * (x - center)
    v^i <- delta * v^i - eta * grad f(x + delta * v^i)
    x^i <- x^i + v^i

  with x the worker's value before the elastic move (the gradient is taken at x + delta v with
  that x). delta = 0 is EASGD's Eq. (1). Returns (x, v, gap) with gap = x - center, what the
  center's Eq. (2) adds alpha times (None without an exchange).
  """
  grad = mlp_gradient(lookahead(x, v, delta), batch["image"], batch["label"])
  gap = None
  if center is not None:
    gap = axpy(-1.0, center, x)
    x = axpy(-alpha, gap, x)
  v = axpy(-eta, grad, scale(delta, v))
  return add(x, v), v, gap


def eamsgd_step_elastic_on_w(x, v, batch, eta, delta, alpha=0.0, center=None):
  """The rule EAMSGD must *not* follow: the elastic force on the look-ahead W = x + delta v
  (gap = W - center), otherwise as `eamsgd_step`. Kept to show the two differ."""
  w = lookahead(x, v, delta)
  grad = mlp_gradient(w, batch["image"], batch["label"])
  gap = None
  if center is not None:
    gap = axpy(-1.0, center, w)
    x = axpy(-alpha, gap, x)
  v = axpy(-eta, grad, scale(delta, v))
  return add(x, v), v, gap


def round_robin_easgd(layers, batches, num_workers, eta, rho, tau, delta=0.0):
  """Algorithm 1 (EAMSGD's Algorithm 2 with delta > 0): iteration t uses worker j = t mod G,
  whose own step is t // G; it exchanges on its own steps 0, tau, 2 tau, ...:

    Eq. (2) center <- center + alpha * (x^j - center), x^j before the worker's update
    Eq. (1) worker j's step (`eamsgd_step`) against the center it read.

  alpha = eta * rho. Returns (center, locals), each local as W^j = x^j + delta v^j.
  """
  alpha = eta * rho
  center = layers
  x = [layers] * num_workers
  v = [zeros_like(layers)] * num_workers
  for t, batch in enumerate(batches):
    j = t % num_workers
    exchange = (t // num_workers) % tau == 0
    x[j], v[j], gap = eamsgd_step(
      x[j], v[j], batch, eta, delta, alpha, center if exchange else None
    )
    if exchange:
      center = axpy(alpha, gap, center)
  return center, [lookahead(xj, vj, delta) for xj, vj in zip(x, v, strict=True)]


def sync_easgd(layers, steps, eta, rho, tau, delta=0.0, elastic_on_w=False):
  """Synchronous EASGD/EAMSGD: `steps` is a list over iterations of P batches, one per worker.

  On iterations 0, tau, 2 tau, ... every worker takes its step against the same center and the
  center moves by alpha * sum_i (x^i - center) (Eq. (2), x^i before the step); otherwise every
  worker takes a local step. `elastic_on_w` replays the wrong rule (the force on W = x + delta v).
  Returns (center, locals), each local as W^i = x^i + delta v^i.
  """
  step = eamsgd_step_elastic_on_w if elastic_on_w else eamsgd_step
  alpha = eta * rho
  workers = len(steps[0])
  center, x = layers, [layers] * workers
  v = [zeros_like(layers)] * workers
  for t, batches in enumerate(steps):
    exchange = t % tau == 0
    gaps = []
    for i, batch in enumerate(batches):
      x[i], v[i], gap = step(x[i], v[i], batch, eta, delta, alpha, center if exchange else None)
      gaps.append(gap)
    if exchange:
      center = axpy(alpha, add(*gaps), center)
  return center, [lookahead(xi, vi, delta) for xi, vi in zip(x, v, strict=True)]


def adamw_step(params, state, grad, lr, weight_decay, b1=0.9, b2=0.999, eps=1e-8):
  """One step of AdamW as optax.adamw writes it (eps_root = 0), in float64:

    m <- b1 m + (1 - b1) g,  n <- b2 n + (1 - b2) g^2,  k <- k + 1
    W <- W - lr * ( (m / (1 - b1^k)) / (sqrt(n / (1 - b2^k)) + eps) + weight_decay * W )

  state = (m, n, k), starting at (zeros, zeros, 0).
  """
  m, n, k = state
  m = [
    (b1 * mw + (1 - b1) * gw, b1 * mb + (1 - b1) * gb)
    for (mw, mb), (gw, gb) in zip(m, grad, strict=True)
  ]
  n = [
    (b2 * nw + (1 - b2) * gw**2, b2 * nb + (1 - b2) * gb**2)
    for (nw, nb), (gw, gb) in zip(n, grad, strict=True)
  ]
  k += 1

  def update(p, mi, ni):
    direction = (mi / (1 - b1**k)) / (np.sqrt(ni / (1 - b2**k)) + eps)
    return p - lr * (direction + weight_decay * p)

  new = [
    (update(pw, mw, nw), update(pb, mb, nb))
    for (pw, pb), (mw, mb), (nw, nb) in zip(params, m, n, strict=True)
  ]
  return new, (m, n, k)


def diloco(layers, steps, tau, inner_lr, weight_decay, outer_lr, outer_momentum):
  """DiLoCo (Douillard et al., 2023) with AdamW inside and Nesterov SGD outside.

  `steps` is a list over iterations of P batches, one per worker. Every step each worker takes
  an AdamW step on its own batch (its moments are its own, never reset); after every tau-th step
  the pseudo-gradient g = center - mean_i W^i feeds the outer step (optax.sgd with
  nesterov=True: t <- g + mu t, center <- center - lr * (g + mu t)) and every worker restarts
  from the new center. Returns (center, locals).
  """
  workers = len(steps[0])
  center, local = layers, [layers] * workers
  inner = [(zeros_like(layers), zeros_like(layers), 0)] * workers
  trace = zeros_like(layers)
  for t, batches in enumerate(steps):
    for i, batch in enumerate(batches):
      grad = mlp_gradient(local[i], batch["image"], batch["label"])
      local[i], inner[i] = adamw_step(local[i], inner[i], grad, inner_lr, weight_decay)
    if (t + 1) % tau == 0:
      average = scale(1.0 / workers, add(*local))
      pseudo_gradient = axpy(-1.0, average, center)
      trace = axpy(outer_momentum, trace, pseudo_gradient)
      center = axpy(-outer_lr, axpy(outer_momentum, trace, pseudo_gradient), center)
      local = [center] * workers
  return center, local

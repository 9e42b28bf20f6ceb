"""The shared step core: loss, gradient, the local optimizer step, evaluation.

Every algorithm is built from these pure functions over parameter pytrees, so SGD, round-robin
EASGD and the other variants differ only in which of them they call, where and when.

Symbols follow the seed: eta (learning rate), W^i (`local`), W-bar (`center`), Delta W
(`grads`). The elastic terms of Eq. (1)/(2) are optax transformations in `elastic.py`.
"""

import math
import numbers

import jax
import jax.numpy as jnp
import optax

from easgd_jax import collectives, optimizers


def make_loss_fn(model):
  """loss_fn(params, batch) -> (mean softmax cross-entropy, logits)."""

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, logits

  return loss_fn


def local_optimizer(learning_rate, momentum=0.0):
  """W <- W - eta * Delta W, or Nesterov momentum (EAMSGD's local step) when momentum > 0."""
  return optimizers.create("nesterov" if momentum else "sgd", learning_rate, momentum)


def make_gradient(loss_fn):
  """gradient(params, batch) -> (Delta W, loss): forward and backward, no update. On a worker
  of several devices (--devices_per_worker), both are the means over its devices' batches."""

  def gradient(params, batch):
    (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    return collectives.worker_mean((grads, loss))

  return gradient


def make_apply_gradient(optimizer):
  """apply_gradient(params, opt_state, grads) -> (params, opt_state): W <- W - eta * Delta W."""

  def apply_gradient(params, opt_state, grads):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return apply_gradient


def make_sgd_step(loss_fn, optimizer, reduce_grads=None):
  """sgd_step(params, opt_state, batch) -> (params, opt_state, loss): forward, backward, update.

  `reduce_grads` combines the gradients across devices before the update (data parallelism).
  """
  gradient, apply_gradient = make_gradient(loss_fn), make_apply_gradient(optimizer)

  def sgd_step(params, opt_state, batch):
    grads, loss = gradient(params, batch)
    if reduce_grads is not None:
      grads = reduce_grads(grads)
    params, opt_state = apply_gradient(params, opt_state, grads)
    return params, opt_state, loss

  return sgd_step


def make_elastic_step(loss_fn, local_tx):
  """elastic_step(params, opt_state, center, batch) -> (params, opt_state, loss): the gradient,
  then Eq. (1) through `local_tx` (an elastic.elastic transformation) against `center`."""
  gradient = make_gradient(loss_fn)

  def elastic_step(params, opt_state, center, batch):
    grads, loss = gradient(params, batch)
    updates, opt_state = local_tx.update(grads, opt_state, params, center=center)
    return optax.apply_updates(params, updates), opt_state, loss

  return elastic_step


def elastic_stability(alpha, num_workers, all_at_once):
  """None when the elastic coupling is stable, else a one-line warning citing the condition.

  With the gradients left out, Eq. (1)/(2) are a linear map on the gaps x^i - W-bar. With the
  moving rate alpha (eta * rho) and beta = G * alpha, as Zhang et al. (2015) write them (they use
  beta = 0.9, alpha = beta / G): one worker exchanging at a time (round-robin, asynchronous,
  Hogwild EASGD) scales its gap by 1 - 2 alpha: stable iff 0 < alpha < 1. All G at once
  (synchronous EASGD) scales a gap shared by every worker by 1 - alpha - beta and differences
  between workers by 1 - alpha: stable iff 0 < alpha and alpha + beta < 2.
  """
  beta = num_workers * alpha
  if alpha <= 0:
    return (
      f"alpha = {alpha:g}: the elastic force is off, the center never moves and the workers "
      f"train independently; raise --rho (or --alpha) above 0 for EASGD"
    )
  if all_at_once and alpha + beta >= 2:
    return (
      f"alpha + beta = alpha*(1+G) = {alpha + beta:g} >= 2 (alpha = {alpha:g}, beta = G*alpha = "
      f"{beta:g}): synchronous EASGD's elastic exchange is unstable (it needs alpha + beta < 2); "
      f"lower --rho (or --alpha) or --learning_rate"
    )
  if not all_at_once and alpha >= 1:
    return (
      f"alpha = {alpha:g} >= 1 (beta = G*alpha = {beta:g}): each one-worker exchange overshoots "
      f"and is unstable (it needs 0 < alpha < 1); lower --rho (or --alpha) or --learning_rate"
    )
  return None


def make_evaluate(loss_fn, batch_size=1000):
  """evaluate(params, images, labels) -> (mean loss, accuracy), in fixed-size chunks."""

  @jax.jit
  def chunk_sums(params, images, labels):
    loss, logits = loss_fn(params, {"image": images, "label": labels})
    correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
    return loss * labels.shape[0], correct

  def evaluate(params, images, labels):
    total_loss, total_correct = 0.0, 0
    for start in range(0, len(labels), batch_size):
      loss, correct = chunk_sums(
        params, images[start : start + batch_size], labels[start : start + batch_size]
      )
      total_loss, total_correct = total_loss + loss, total_correct + correct
    count = labels.size  # examples, or a text's predicted characters
    return float(total_loss) / len(labels), float(total_correct) / count

  return evaluate


def inner_or_default(optimizer, learning_rate, momentum=0.0):
  """`optimizer` when given, else plain SGD at `learning_rate` (Nesterov when `momentum` > 0)."""
  if optimizer is not None:
    return optimizer
  check_hyperparameters(learning_rate=learning_rate, momentum=momentum)
  return local_optimizer(learning_rate, momentum)


def moving_rate(alpha=None, learning_rate=None, rho=None):
  """alpha of Eq. (1)/(2), checked: `alpha` itself, or learning_rate * rho (rho 1.0 if unset)."""
  if alpha is not None:
    if not (_is_finite(alpha) and alpha >= 0):  # elastic_stability warns when it is too large
      raise ValueError(f"alpha must be a finite number >= 0 (got {alpha!r})")
    return alpha
  rho = 1.0 if rho is None else rho
  check_hyperparameters(learning_rate=learning_rate, rho=rho)
  return learning_rate * rho


def check_hyperparameters(*, learning_rate=1.0, momentum=0.0, rho=None, tau=None, **counts):
  """Raises a ValueError naming the first bad argument, before an algorithm is built on it.

  Every algorithm's constructor calls this, so a notebook's `tau=0` fails here with a message,
  not later as a ZeroDivisionError inside a step. `counts` are worker or device counts
  (num_workers=..., num_devices=...), each an integer >= 1; rho and tau are checked when given.
  """
  if not (_is_finite(learning_rate) and learning_rate > 0):
    raise ValueError(f"learning_rate (eta) must be a finite number > 0 (got {learning_rate!r})")
  if not (_is_finite(momentum) and 0 <= momentum < 1):
    raise ValueError(f"momentum (delta) must be a number in [0, 1) (got {momentum!r})")
  if rho is not None and not (_is_finite(rho) and rho >= 0):
    raise ValueError(f"rho must be a finite number >= 0 (got {rho!r})")
  for name, value in (({} if tau is None else {"tau": tau}) | counts).items():
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1):
      raise ValueError(f"{name} must be an integer >= 1 (got {value!r})")


def _is_finite(value):
  try:
    return not isinstance(value, bool) and math.isfinite(value)
  except TypeError:  # not a number at all
    return False

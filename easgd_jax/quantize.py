"""Narrow wire formats for an outer gradient: a tensor cast to few bits with a float32 absmax
scale, and back (Streaming DiLoCo, Douillard et al. 2025, quantizes its pseudo-gradients so).

  s = max_row |x| / largest      one float32 scale per row: the last axis of a matrix or kernel
                                 (a vector or scalar: one per tensor)
  q = cast(x / s)                rounded to nearest, ties to even (XLA's casts, jnp.round)
  x' = q * s                     dequantized in x's dtype, where the sum happens

The scale is what keeps a pseudo-gradient's small entries: cast unscaled, e2m1's 1e-3 becomes 0
(its smallest step is 0.5). `bf16` is a plain cast: its exponent range is float32's, so a scale
would cost 4 bytes a row and buy nothing. `fp8` is e4m3 (±448, 3 mantissa bits); `fp4` is
float4_e2m1fn (0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives): the paper's fp4 is E3M0, which
ml_dtypes (and so XLA) does not have.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Format(NamedTuple):
  dtype: Any  # what travels
  largest: float | None  # the scaled values' bound (the largest finite value); None: unscaled
  bits: int  # per value on the wire


FORMATS = {
  "none": Format(None, None, 32),  # as it is (float32)
  "bf16": Format(jnp.bfloat16, None, 16),
  "fp8": Format(jnp.float8_e4m3fn, 448.0, 8),
  "int8": Format(jnp.int8, 127.0, 8),
  "fp4": Format(jnp.float4_e2m1fn, 6.0, 4),
}
SCALE_BYTES = 4  # a float32 scale


def _rows(x):
  return x.reshape(-1, x.shape[-1]) if x.ndim >= 2 else x.reshape(1, -1)


def quantize(x, name):
  """(q, scale) of `x` in the format `name`: q in rows (see _rows), scale [rows, 1] float32
  (None for an unscaled format)."""
  fmt = FORMATS[name]
  if fmt.largest is None:
    return x.astype(fmt.dtype or x.dtype), None
  rows = _rows(x)
  absmax = jnp.max(jnp.abs(rows), axis=1, keepdims=True)
  scale = jnp.where(absmax > 0, absmax / fmt.largest, 1).astype(jnp.float32)
  # The float32 scale may round below absmax / largest: clip, so no value casts past the range.
  scaled = jnp.clip(rows / scale, -fmt.largest, fmt.largest)
  if jnp.issubdtype(fmt.dtype, jnp.integer):
    scaled = jnp.round(scaled)
  return scaled.astype(fmt.dtype), scale


def dequantize(q, scale, like):
  """q (and its scale) back in the dtype and shape of `like`."""
  x = q.astype(like.dtype)
  return (x if scale is None else x * scale).reshape(like.shape)


def roundtrip(tree, name):
  """dequantize(quantize(x)) of every leaf: what a receiver of `tree` sums."""
  return jax.tree.map(lambda x: dequantize(*quantize(x, name), x), tree)


def wire_bytes(shape, name):
  """Bytes a tensor of `shape` takes in the format `name`, its scales included."""
  fmt, size = FORMATS[name], math.prod(shape)
  if fmt.largest is None:
    return size * fmt.bits / 8
  return size * fmt.bits / 8 + math.prod(shape[:-1] if len(shape) >= 2 else ()) * SCALE_BYTES

"""Building blocks shared by every model: a projection with logical axes, RMSNorm, rotary embeddings, SwiGLU."""
from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.parallel.rules import constrain


def param(rngs: nnx.Rngs, shape: Sequence[int], axes: Sequence[str], std: float, dtype=jnp.float32) -> nnx.Param:
  value = std * jax.random.truncated_normal(rngs.params(), -2.0, 2.0, tuple(shape), dtype)
  return nnx.Param(value, logical_axes=tuple(axes))


class Dense(nnx.Module):
  """y = x · W over the last `len(in_shape)` axes of x; W has shape in_shape + out_shape.

  Kept as one einsum with named logical axes so that tensor parallelism can split heads or hidden units.
  `std` defaults to 1/sqrt(fan_in).
  """

  def __init__(self, in_shape, out_shape, axes, *, rngs, std=None, dtype=jnp.float32):
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    fan_in = math.prod(in_shape)
    self.kernel = param(rngs, in_shape + out_shape, axes, std if std is not None else fan_in ** -0.5, dtype)
    self.n_in = len(in_shape)

  def __call__(self, x):
    w = self.kernel[...].astype(x.dtype)
    batch = 'WXYZ'[: x.ndim - self.n_in]
    ins, outs = 'abcd'[: self.n_in], 'efgh'[: w.ndim - self.n_in]
    return jnp.einsum(f'{batch}{ins},{ins}{outs}->{batch}{outs}', x, w)


class RMSNorm(nnx.Module):
  """x / rms(x) · scale, computed in fp32 and returned in the input dtype."""

  def __init__(self, dim: int, *, eps: float = 1e-6, rngs: nnx.Rngs | None = None):
    del rngs
    self.scale = nnx.Param(jnp.ones((dim,), jnp.float32), logical_axes=('norm',))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def l2_normalize(z, eps: float = 1e-6):
  """z / ‖z‖ over the last axis, the norm taken in fp32."""
  return z * jax.lax.rsqrt(jnp.sum(jnp.square(z.astype(jnp.float32)), -1, keepdims=True) + eps).astype(z.dtype)


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (Su et al., RoFormer) on [B, T, H, D] at integer positions [B, T], half-split layout."""
  d = x.shape[-1]
  freq = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
  angle = positions.astype(jnp.float32)[..., None] * freq          # [B, T, D/2]
  sin, cos = jnp.sin(angle)[:, :, None, :], jnp.cos(angle)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


class SwiGLU(nnx.Module):
  """MLP(x) = W_down (silu(W_gate x) ⊙ W_up x)  (Shazeer, "GLU Variants Improve Transformer")."""

  def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, out_std: float):
    self.gate = Dense((d_model,), (hidden,), ('embed', 'mlp'), rngs=rngs)
    self.up = Dense((d_model,), (hidden,), ('embed', 'mlp'), rngs=rngs)
    self.down = Dense((hidden,), (d_model,), ('mlp', 'embed'), rngs=rngs, std=out_std)

  def __call__(self, x):
    h = jax.nn.silu(self.gate(x)) * self.up(x)
    h = constrain(h, ('batch', 'length', 'act_mlp'))
    return self.down(h)

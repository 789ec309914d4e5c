"""(I + A)⁻¹ for strictly lower-triangular A [..., C, C], by forward substitution over rows, with a closed-form
backward pass. Used by the chunked delta rule for its UT transform.

Built from matmuls and a row loop rather than a triangular-solve call: XLA's CPU runtime can stall on batched
LAPACK triangular solves under differentiation, and on accelerators the explicit inverse is the form the fast
kernels use (the inverse is then applied with matmuls).

With X = (I + A)⁻¹ − I (strictly lower): X_i = −A_i + (−A_i) X, row by row, since row i of −A only reaches rows
before i, which are final. Backward: dX = −X̃ dA X̃ with X̃ = (I + A)⁻¹, so Ā = strictLower(−X̃ᵀ X̄ X̃ᵀ).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _inverse(a):
  c = a.shape[-1]
  x = -a

  def row(i, x):
    r = jax.lax.dynamic_index_in_dim(x, i, axis=-2, keepdims=False)          # [..., C]
    r = r + jnp.einsum('...j,...jk->...k', r, x)
    return jax.lax.dynamic_update_index_in_dim(x, r, i, axis=-2)

  x = jax.lax.fori_loop(1, c, row, x)
  return x + jnp.eye(c, dtype=a.dtype)


@jax.custom_vjp
def unit_lower_inverse(a):
  """(I + A)⁻¹ for strictly lower-triangular A (entries on and above the diagonal are ignored)."""
  return _inverse(jnp.tril(a, -1))


def _fwd(a):
  inv = _inverse(jnp.tril(a, -1))
  return inv, inv


def _bwd(inv, g):
  t = jnp.swapaxes(inv, -1, -2)
  return (jnp.tril(-(t @ g @ t), -1),)


unit_lower_inverse.defvjp(_fwd, _bwd)

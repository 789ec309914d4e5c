"""(I + A)⁻¹ for strictly lower-triangular A [..., C, C], by forward substitution over rows, with a closed-form
backward pass. Used by the chunked delta rule for its UT transform.

Built from matmuls and a row loop rather than a triangular-solve call: XLA's CPU runtime can stall on batched
LAPACK triangular solves under differentiation, and on accelerators the explicit inverse is the form the fast
kernels use (the inverse is then applied with matmuls). On GPU the forward pass is a Pallas kernel
(kernels_pallas.linear.inverse: the same arithmetic, one program per matrix, no loop through device memory).

With X = (I + A)⁻¹ − I (strictly lower): X_i = −A_i + (−A_i) X, row by row, since row i of −A only reaches rows
before i, which are final; done inside 16×16 diagonal blocks, which are then joined by block forward
substitution. Backward: dX = −X̃ dA X̃ with X̃ = (I + A)⁻¹, so Ā = strictLower(−X̃ᵀ X̄ X̃ᵀ).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging


def _row_inverse(a):
  c = a.shape[-1]
  x = -a

  def row(i, x):
    r = jax.lax.dynamic_index_in_dim(x, i, axis=-2, keepdims=False)          # [..., C]
    r = r + jnp.einsum('...j,...jk->...k', r, x)
    return jax.lax.dynamic_update_index_in_dim(x, r, i, axis=-2)

  x = jax.lax.fori_loop(1, c, row, x)
  return x + jnp.eye(c, dtype=a.dtype)


def _inverse(a, block=16):
  """Row substitution inside diagonal blocks of `block`, then block rows by matmuls:
  X_ij = −X_ii Σ_{j ≤ k < i} A_ik X_kj. The row loop then touches [.., C/block, block, block] instead of [.., C, C]
  per step, and runs `block` steps instead of C."""
  c = a.shape[-1]
  if c <= block or c % block:
    return _row_inverse(a)
  nb = c // block
  lead = a.shape[:-2]
  blocks = a.reshape(lead + (nb, block, nb, block))
  diag = _row_inverse(jnp.stack([blocks[..., i, :, i, :] for i in range(nb)], axis=-3))   # [.., nb, b, b]
  rows = [jnp.pad(diag[..., 0, :, :], [(0, 0)] * len(lead) + [(0, 0), (0, c - block)])]
  for i in range(1, nb):
    done = jnp.concatenate([r[..., :i * block] for r in rows], axis=-2)                  # X[:i·b, :i·b]
    left = diag[..., i, :, :] @ -(a[..., i * block:(i + 1) * block, :i * block] @ done)  # [.., b, i·b]
    rows.append(jnp.concatenate([left, diag[..., i, :, :], jnp.zeros(lead + (block, c - (i + 1) * block), a.dtype)],
                                axis=-1))
  return jnp.concatenate(rows, axis=-2)


KERNELS = ('jax', 'pallas', 'pallas_interpret')
_logged: set[tuple] = set()


def choose(requested: str, c: int, platform: str) -> str:
  """The inverse's path for chunk size c given the linear layers' kernel setting (model.linear.kernel: auto |
  pallas | jax | pallas_interpret): the Pallas kernel on GPU where it applies (interpret mode when asked for),
  else the jax form. Logged once per choice."""
  from kernels_pallas.linear import inverse
  ok, why = inverse.supported(c)
  if requested == 'pallas_interpret' and ok:
    choice = 'pallas_interpret'
  elif requested in ('auto', 'pallas') and ok and platform == 'gpu':
    choice = 'pallas'
  else:
    choice = 'jax'
  key = (choice, requested, platform, c)
  if key not in _logged:
    _logged.add(key)
    logging.info('unit-lower inverse: %s (requested %s; platform %s, chunk %d%s)', choice, requested, platform, c,
                 f'; kernel refused: {why}' if not ok else '')
  return choice


def _forward(a, kernel):
  if kernel == 'jax':
    return _inverse(jnp.tril(a, -1))
  from kernels_pallas.linear import inverse
  return inverse.unit_lower_inverse(a.astype(jnp.float32), interpret=kernel == 'pallas_interpret').astype(a.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _unit_lower_inverse(a, kernel):
  return _forward(a, kernel)


def _fwd(a, kernel):
  inv = _forward(a, kernel)
  return inv, inv


def _bwd(kernel, inv, g):
  t = jnp.swapaxes(inv, -1, -2)
  return (jnp.tril(-(t @ g @ t), -1),)


_unit_lower_inverse.defvjp(_fwd, _bwd)


def unit_lower_inverse(a, kernel: str = 'jax'):
  """(I + A)⁻¹ for strictly lower-triangular A [..., C, C] (entries on and above the diagonal are ignored).
  `kernel`: jax, or pallas / pallas_interpret for kernels_pallas.linear.inverse (`choose` picks one)."""
  if kernel not in KERNELS:
    raise ValueError(f'unit_lower_inverse kernel {kernel!r}: expected one of {", ".join(KERNELS)}')
  return _unit_lower_inverse(a, kernel)

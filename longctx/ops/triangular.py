"""(I + A)⁻¹ for strictly lower-triangular A [..., C, C] from matmuls, with a closed-form backward pass. Used by
the chunked delta rule for its UT transform.

Built from matmuls rather than a triangular-solve call: XLA's CPU runtime can stall on batched LAPACK triangular
solves under differentiation, and on accelerators the explicit inverse is the form the fast kernels use (the inverse
is then applied with matmuls). On GPU the forward pass is a Pallas kernel (kernels_pallas.linear.inverse: the same
arithmetic, one program per matrix, no loop through device memory).

The 16×16 diagonal blocks are inverted by doubling (`doubling_inverse`: three levels of two products instead of a
15-step row loop), then joined by block forward substitution. Backward: dX = −X̃ dA X̃ with X̃ = (I + A)⁻¹,
so Ā = strictLower(−X̃ᵀ X̄ X̃ᵀ).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging


def doubling_inverse(a, matmul):
  """(I + A)⁻¹ of strictly lower-triangular A [..., C, C] (entries on and above the diagonal ignored) by doubling:
  with D the inverses of the diagonal blocks of size s (the index's low bits), the inverse for blocks of size 2s is
  D − D A' D, A' the lower-left s-blocks of A inside each 2s-block (A' D A' vanishes). The first level (s = 1) is
  I − A' itself, then ⌈log₂ C⌉ − 1 levels of two products each (`matmul`, batched over the leading axes), no serial
  loop; every intermediate is a true sub-inverse, so nothing grows beyond the inverse itself (powers of A, which a
  Neumann product would form, do)."""
  c = a.shape[-1]
  row = jax.lax.broadcasted_iota(jnp.int32, (c, c), 0)
  col = jax.lax.broadcasted_iota(jnp.int32, (c, c), 1)
  lower_left = lambda s: (row // (2 * s) == col // (2 * s)) & ((row // s) % 2 == 1) & ((col // s) % 2 == 0)
  x = jnp.where(row == col, 1.0, 0.0) - jnp.where(lower_left(1), a, 0.0)
  s = 2
  while s < c:
    x = x - matmul(matmul(x, jnp.where(lower_left(s), a, 0.0)), x)
    s *= 2
  return x


def _exact_matmul(x, y):
  return jnp.matmul(x, y, precision=jax.lax.Precision.HIGHEST)


def _inverse(a, block=16):
  """Doubling inside diagonal blocks of `block` (exact fp32 products), then block rows by matmuls:
  X_ij = −X_ii Σ_{j ≤ k < i} A_ik X_kj."""
  c = a.shape[-1]
  if c <= block or c % block:
    return doubling_inverse(a, _exact_matmul)
  nb = c // block
  lead = a.shape[:-2]
  blocks = a.reshape(lead + (nb, block, nb, block))
  diag = doubling_inverse(jnp.stack([blocks[..., i, :, i, :] for i in range(nb)], axis=-3), _exact_matmul)
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

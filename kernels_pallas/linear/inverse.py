"""A Pallas kernel for (I + A)⁻¹ of strictly lower-triangular chunk matrices A [M, C, C] (the delta rule's UT
transform; `longctx.ops.triangular` is its reference and its fallback).

One program per matrix holds it on chip: the 16×16 diagonal blocks by doubling (products of 16×16 blocks at the
kernel's fp32 precision, no serial row loop), then the blocks below the diagonal by block forward substitution
with matmuls, X_ij = −X_ii Σ_{j≤k<i} A_ik X_kj, written once. The jax form does the same with batched matmuls
through device memory.

Portable Pallas (refs, static slices, dots), lowered through the Triton lowering; the tests run it on CPU in
interpret mode. C must be a multiple of 16 (at most 128: the program keeps C²/16 blocks in registers).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.linear.steps import dot
from longctx.ops.triangular import doubling_inverse

BLOCK = 16
MAX_CHUNK = 128


def supported(c: int) -> tuple[bool, str]:
  """Whether the kernel takes chunk matrices of size c, and if not, why."""
  if c % BLOCK or not BLOCK <= c <= MAX_CHUNK:
    return False, f'chunk {c} is not a multiple of {BLOCK} between {BLOCK} and {MAX_CHUNK}'
  return True, ''


def block_inverse(a_block, nb: int, precision: str):
  """X = (I + A)⁻¹ of a strictly lower-triangular [nb·16, nb·16] matrix given by its blocks (`a_block(i, k)`: the
  [16, 16] block A_ik, k ≤ i, in fp32; the diagonal blocks' upper triangles are ignored), as a dict of the nonzero
  blocks X_ij, j ≤ i: the diagonal blocks by doubling (`triangular.doubling_inverse`), the rest by block forward
  substitution. Each block of A is formed once."""
  block = functools.cache(a_block)
  mm = lambda x, y: dot(x, y, precision)
  x = {}
  for i in range(nb):
    x[i, i] = doubling_inverse(block(i, i), mm)
    for j in range(i):
      acc = sum(mm(block(i, k), x[k, j]) for k in range(j, i))
      x[i, j] = -mm(x[i, i], acc)
  return x


def store_blocks(o_ref, x, nb: int, i: int):
  """Writes block row i of `block_inverse`'s X into o_ref [C, C], zeros above the diagonal."""
  for j in range(nb):
    o_ref[block_rows(i), block_rows(j)] = x.get((i, j), jnp.zeros((BLOCK, BLOCK), jnp.float32)).astype(o_ref.dtype)


def block_rows(i):
  """The rows (or columns) of 16-block i."""
  return pl.ds(i * BLOCK, BLOCK)


def _kernel(a_ref, o_ref, *, precision):
  nb = a_ref.shape[-1] // BLOCK
  x = block_inverse(lambda i, k: a_ref[block_rows(i), block_rows(k)].astype(jnp.float32), nb, precision)
  for i in range(nb):
    store_blocks(o_ref, x, nb, i)


@functools.partial(jax.jit, static_argnames=('interpret', 'precision', 'num_warps'))
def unit_lower_inverse(a, *, interpret: bool = False, precision: str = 'tf32', num_warps: int = 4):
  """(I + A)⁻¹ for A [..., C, C], of which only the strictly lower triangle is read; fp32. No gradient of its own:
  `longctx.ops.triangular.unit_lower_inverse` wraps it with the closed-form backward pass."""
  c = a.shape[-1]
  ok, why = supported(c)
  if not ok:
    raise ValueError(f'unit-lower inverse kernel: {why}')
  lead = a.shape[:-2]
  flat = a.reshape((-1, c, c))
  spec = pl.BlockSpec((None, c, c), lambda m: (m, 0, 0))
  out = pl.pallas_call(
      functools.partial(_kernel, precision=precision), grid=(flat.shape[0],), in_specs=[spec], out_specs=spec,
      out_shape=jax.ShapeDtypeStruct(flat.shape, jnp.float32), interpret=interpret,
      compiler_params=None if interpret else pltriton.CompilerParams(num_warps=num_warps, num_stages=1),
      name='unit_lower_inverse')(flat)
  return out.reshape(lead + (c, c))

"""Pallas kernels for the chunk state pass (see `reference.state_pass` for the operands and the recurrence).

One program per (batch·head, block of value columns) keeps its state block S [Dk, BV] in fp32 registers and walks
the chunks in order, so the state never goes to device memory between chunks; the jax form's scan writes and reads
it back at every chunk and launches a handful of kernels per chunk. Each chunk costs three (four with w) small
matmuls, [C, Dk] × [Dk, BV] and [C, C] × [C, BV] and their transposes.

Backward (`custom_vjp`), as SPEC.md asks, recomputes the states rather than storing them in the forward pass: a
forward sweep writes the state S entering each chunk (and the delta rule's U), then a reverse sweep carries the
gradient dS of the state leaving each chunk, writing it and dU (all four in bf16 when the kernels multiply in bf16;
the carried states stay fp32):
    dU = pᵀ dO + k̃ dS,    dS ← a ⊙ dS + q̃ᵀ dO − wᵀ dU
The rest needs nothing carried and runs as batched matmuls over all chunks at once:
    dq̃ = dO Sᵀ,   dp = dO Uᵀ,   dk̃ = U dSᵀ,   dw = −dU Sᵀ,   da = rowsum(S ⊙ dS)

The GPU kernels use only portable Pallas (refs, `pl.ds`, dots, loops), lowered through the Triton lowering
(`jax.experimental.pallas.triton.CompilerParams`), and run on CPU in interpret mode for the tests; the TPU kernels
(`tpu`, Mosaic TPU) share the per-chunk arithmetic (`steps`) and run on CPU in TPU interpret mode. Shapes: C, Dk
and BV powers of two, at least 16 (`supported` says whether a call qualifies; callers pad head dims).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from kernels_pallas.linear import steps, tpu


class Options(NamedTuple):
  chunk: int
  block_v: int = 32
  interpret: bool = False
  num_warps: int = 4
  num_stages: int = 1
  precision: str = 'tf32'   # the matmuls: tf32 (fp32 operands, the platform default) | ieee | bf16 (see steps.dot)
  backend: str = 'gpu'      # gpu: the Triton-lowered kernels here; tpu: kernels_pallas.linear.tpu (Mosaic TPU)
  heads: int = 0            # > 0: O in the tokens' layout [B, T, H, Dv] (B·H = the operands' first axis)
  out_dtype: str = 'float32'


def _pow2(n):
  return n >= 16 and n & (n - 1) == 0


def supported(chunk: int, dk: int, dv: int, block_v: int = 32) -> tuple[bool, str]:
  """Whether the kernels take these sizes, and if not, why."""
  for name, n in (('chunk size', chunk), ('key head dim', dk), ('value block', min(block_v, dv))):
    if not _pow2(n):
      return False, f'{name} {n} is not a power of two ≥ 16'
  if dv % min(block_v, dv):
    return False, f'value head dim {dv} is not a multiple of the value block {block_v}'
  return True, ''


def _fwd_kernel(*refs, chunk, n_chunks, delta, store_states, precision):
  q_ref, k_ref, u_ref, p_ref, a_ref, h0_ref, w_ref, (o_ref, hT_ref), (h_ref, U_ref) = steps.forward_refs(
      refs, delta, store_states)
  dk = q_ref.shape[-1]

  def body(n, S):
    rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
    w = None if w_ref is None else w_ref[rows, :]
    if store_states:
      # The backward pass's sweep: it needs the states and U, not the output (left unwritten).
      h_ref[pl.ds(pl.multiple_of(n * dk, dk), dk), :] = S.astype(h_ref.dtype)
      U = steps.corrected(S, u_ref[rows, :], w, precision)
      if delta:
        U_ref[rows, :] = U.astype(U_ref.dtype)
    else:
      o, U = steps.output(S, q_ref[rows, :], u_ref[rows, :], p_ref[rows, :], w, precision)
      o_ref[rows, :] = o.astype(o_ref.dtype)
    return steps.advance(S, k_ref[rows, :], U, a_ref[:, pl.ds(n, 1)], precision)

  hT_ref[...] = jax.lax.fori_loop(0, n_chunks, body, h0_ref[...].astype(jnp.float32))


def _bwd_kernel(*refs, chunk, n_chunks, delta, precision):
  q_ref, k_ref, p_ref, a_ref, do_ref, dhT_ref, w_ref, (dS_ref, dU_ref, dh0_ref) = steps.reverse_refs(refs, delta)
  dk = q_ref.shape[-1]

  def body(i, dS):
    n = n_chunks - 1 - i
    rows = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
    dS_ref[pl.ds(pl.multiple_of(n * dk, dk), dk), :] = dS.astype(dS_ref.dtype)
    do = do_ref[rows, :].astype(jnp.float32)
    dU = steps.value_grad(dS, k_ref[rows, :], p_ref[rows, :], do, precision)
    dU_ref[rows, :] = dU.astype(dU_ref.dtype)
    return steps.retreat(dS, q_ref[rows, :], a_ref[:, pl.ds(n, 1)], do,
                         None if w_ref is None else w_ref[rows, :], dU, precision)

  dh0_ref[...] = jax.lax.fori_loop(0, n_chunks, body, dhT_ref[...].astype(jnp.float32))


def _kept_dtype(opts):
  """The dtype of what the sweeps keep for the backward pass's batched matmuls (states, U, dS, dU): bf16 when the
  kernels multiply in bf16, as the sweeps themselves round these operands to bf16 for their matmuls."""
  return jnp.bfloat16 if opts.precision == 'bf16' else jnp.float32


def _compiler_params(opts):
  return None if opts.interpret else pltriton.CompilerParams(num_warps=opts.num_warps, num_stages=opts.num_stages)


def _specs(opts, t, dk, dv):
  bv = min(opts.block_v, dv)
  whole = lambda d: pl.BlockSpec((None, t, d), lambda i, j: (i, 0, 0))
  vcols = lambda rows: pl.BlockSpec((None, rows, bv), lambda i, j: (i, 0, j))
  decay = pl.BlockSpec((None, dk, t // opts.chunk), lambda i, j: (i, 0, 0))
  return whole, vcols, decay, dv // bv


def _output_spec(opts, bh, t, dv):
  """(spec, shape) of O and its gradient: heads-first [BH, T, Dv] fp32, or the tokens' layout [B, T, H, Dv] in
  `out_dtype` when `heads` is set."""
  if not opts.heads:
    return _specs(opts, t, dv, dv)[1](t), jax.ShapeDtypeStruct((bh, t, dv), jnp.float32)
  h, bv = opts.heads, min(opts.block_v, dv)
  return (pl.BlockSpec((None, t, None, bv), lambda i, j: (i // h, 0, i % h, j)),
          jax.ShapeDtypeStruct((bh // h, t, h, dv), jnp.dtype(opts.out_dtype)))


def _call(kernel, opts, grid, in_specs, out_specs, out_shape, name):
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        interpret=opts.interpret, compiler_params=_compiler_params(opts), name=name)


def _forward(q, k, u, p, a, h0, w, opts, store_states):
  """(O, final S), or with `store_states` (the backward pass's sweep) also the state entering each chunk
  [BH, N·Dk, Dv] and, for the delta rule, the corrected values U [BH, T, Dv], with O then left uncomputed on the
  GPU."""
  if opts.backend == 'tpu':
    return tpu.forward(q, k, u, p, a, h0, w, opts, store_states)
  bh, t, dk = q.shape
  dv = u.shape[-1]
  n = t // opts.chunk
  whole, vcols, decay, nv = _specs(opts, t, dk, dv)
  in_specs = [whole(dk), whole(dk), vcols(t), whole(opts.chunk), decay, vcols(dk)] + [whole(dk)] * (w is not None)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  o_spec, o_shape = _output_spec(opts, bh, t, dv)
  out_shape = [o_shape, f32(bh, dk, dv)]
  out_specs = [o_spec, vcols(dk)]
  if store_states:
    kept = lambda *shape: jax.ShapeDtypeStruct(shape, _kept_dtype(opts))
    out_shape.append(kept(bh, n * dk, dv))
    out_specs.append(vcols(n * dk))
    if w is not None:
      out_shape.append(kept(bh, t, dv))
      out_specs.append(vcols(t))
  kernel = functools.partial(_fwd_kernel, chunk=opts.chunk, n_chunks=n, delta=w is not None,
                             store_states=store_states, precision=opts.precision)
  args = [q, k, u, p, a, h0] + ([w] if w is not None else [])
  return _call(kernel, opts, (bh, nv), in_specs, out_specs, out_shape, 'linear_state_pass_fwd')(*args)


def _reverse(q, k, p, a, do, dhT, w, opts):
  """The reverse sweep: (dS leaving each chunk [BH, N·Dk, Dv], dU [BH, T, Dv], dS of the initial state)."""
  if opts.backend == 'tpu':
    return tpu.reverse(q, k, p, a, do, dhT, w, opts)
  bh, t, dk = q.shape
  dv = do.shape[-1]
  n = t // opts.chunk
  whole, vcols, decay, nv = _specs(opts, t, dk, dv)
  in_specs = ([whole(dk), whole(dk), whole(opts.chunk), decay, _output_spec(opts, bh, t, dv)[0], vcols(dk)]
              + [whole(dk)] * (w is not None))
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  kept = lambda *shape: jax.ShapeDtypeStruct(shape, _kept_dtype(opts))
  kernel = functools.partial(_bwd_kernel, chunk=opts.chunk, n_chunks=n, delta=w is not None, precision=opts.precision)
  args = [q, k, p, a, do, dhT] + ([w] if w is not None else [])
  return _call(kernel, opts, (bh, nv), in_specs, [vcols(n * dk), vcols(t), vcols(dk)],
               [kept(bh, n * dk, dv), kept(bh, t, dv), f32(bh, dk, dv)], 'linear_state_pass_bwd')(*args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _state_pass(q, k, u, p, a, h0, w, opts):
  return tuple(_forward(q, k, u, p, a, h0, w, opts, store_states=False))


def _state_pass_fwd(q, k, u, p, a, h0, w, opts):
  return _state_pass(q, k, u, p, a, h0, w, opts), (q, k, u, p, a, h0, w)


def _state_pass_bwd(opts, res, grads):
  q, k, u, p, a, h0, w = res
  do, dhT = grads
  bh, t, dk = q.shape
  n, c, dv = t // opts.chunk, opts.chunk, u.shape[-1]
  states = _forward(q, k, u, p, a, h0, w, opts, store_states=True)
  h = states[2].reshape(bh, n, dk, dv)
  U = (states[3] if w is not None else u).reshape(bh, n, c, dv)
  dS, dU, dh0 = _reverse(q, k, p, a, do, dhT, w, opts)
  dS = dS.reshape(bh, n, dk, dv)
  # What needs no carried gradient is computed for all chunks at once.
  if opts.heads:
    do = jnp.swapaxes(do, 1, 2)
  dO = do.astype(_kept_dtype(opts)).reshape(bh, n, c, dv)
  f32_ein = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
  ein = lambda spec, x, y: f32_ein(spec, x, y).reshape(bh, t, -1)
  dq = ein('bncv,bndv->bncd', dO, h)
  dk_ = ein('bncv,bndv->bncd', U, dS)
  dp = ein('bncv,bnjv->bncj', dO, U)
  da = f32_ein('bndv,bndv->bdn', h, dS)
  dw = None if w is None else -ein('bncv,bndv->bncd', dU.reshape(bh, n, c, dv), h)
  cast = lambda g, x: None if x is None else g.astype(x.dtype)
  return (cast(dq, q), cast(dk_, k), cast(dU, u), cast(dp, p), cast(da, a), cast(dh0, h0), cast(dw, w))


_state_pass.defvjp(_state_pass_fwd, _state_pass_bwd)


def state_pass(q, k, u, p, a, h0, w=None, *, chunk: int, block_v: int = 32, interpret: bool = False,
               num_warps: int = 4, num_stages: int = 1, precision: str = 'tf32', backend: str = 'gpu',
               heads: int = 0, out_dtype=jnp.float32):
  """The kernel form of `reference.state_pass`: same operands, layout and returns (O fp32, final S fp32); with
  `heads`, O comes in the tokens' layout [B, T, H, Dv] (B·H the operands' first axis) and in `out_dtype`, written
  so by the GPU kernel (and its gradient read so), which spares a transpose of O and of its gradient.
  `backend` gpu or tpu; `interpret` runs either on any platform (the TPU one through TPU interpret mode)."""
  ok, why = supported(chunk, q.shape[-1], u.shape[-1], block_v)
  if not ok:
    raise ValueError(f'linear state-pass kernel: {why}')
  if backend not in ('gpu', 'tpu'):
    raise ValueError(f'linear state-pass kernel: backend {backend!r}, expected gpu or tpu')
  if heads and q.shape[0] % heads:
    raise ValueError(f'linear state-pass kernel: heads {heads} does not divide the operands\' first axis '
                     f'{q.shape[0]}')
  gpu_layout = heads if backend == 'gpu' else 0
  opts = Options(chunk, min(block_v, u.shape[-1]), interpret, num_warps, num_stages, precision, backend, gpu_layout,
                 jnp.dtype(out_dtype).name)
  o, state = _state_pass(q, k, u, p, a, h0.astype(jnp.float32), w, opts)
  if heads and not gpu_layout:   # the TPU kernels write heads-first
    bh, t, dv = o.shape
    o = jnp.swapaxes(o.reshape(bh // heads, heads, t, dv), 1, 2).astype(out_dtype)
  return o, state

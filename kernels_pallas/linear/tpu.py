"""The state pass for TPUs (Mosaic TPU): one grid step per chunk, the chunk axis sequential ("arbitrary"), the state
block in a VMEM scratch that persists across it, each chunk's operands brought into VMEM by the block pipeline.
Same operands and results as the GPU kernels in `kernel`; tested on CPU in TPU interpret mode."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.linear import steps


def _params(opts):
  return pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary'))


def _interpret(opts):
  return pltpu.InterpretParams() if opts.interpret else False


def _fwd_kernel(*refs, n_chunks, delta, store_states):
  *refs, S_ref = refs
  q_ref, k_ref, u_ref, p_ref, a_ref, h0_ref, w_ref, (o_ref, hT_ref), (h_ref, U_ref) = steps.forward_refs(
      refs, delta, store_states)
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    S_ref[...] = h0_ref[...].astype(jnp.float32)

  S = S_ref[...]
  if store_states:
    h_ref[...] = S
  o, U = steps.output(S, q_ref[...], u_ref[...], p_ref[...], None if w_ref is None else w_ref[...], 'default')
  o_ref[...] = o
  if store_states and delta:
    U_ref[...] = U
  S_next = steps.advance(S, k_ref[...], U, a_ref[...], 'default')
  S_ref[...] = S_next

  @pl.when(n == n_chunks - 1)
  def _():
    hT_ref[...] = S_next


def _bwd_kernel(*refs, n_chunks, delta):
  *refs, dS_scratch = refs
  q_ref, k_ref, p_ref, a_ref, do_ref, dhT_ref, w_ref, (dS_ref, dU_ref, dh0_ref) = steps.reverse_refs(refs, delta)
  i = pl.program_id(2)

  @pl.when(i == 0)
  def _():
    dS_scratch[...] = dhT_ref[...].astype(jnp.float32)

  dS = dS_scratch[...]
  dS_ref[...] = dS
  do = do_ref[...].astype(jnp.float32)
  dU = steps.value_grad(dS, k_ref[...], p_ref[...], do, 'default')
  dU_ref[...] = dU
  dS = steps.retreat(dS, q_ref[...], a_ref[...], do, None if w_ref is None else w_ref[...], dU, 'default')
  dS_scratch[...] = dS

  @pl.when(i == n_chunks - 1)
  def _():
    dh0_ref[...] = dS


def _specs(t, c, dk, bv, n, reverse):
  at = (lambda i: n - 1 - i) if reverse else (lambda i: i)
  rows = lambda d: pl.BlockSpec((None, c, d), lambda b, j, i: (b, at(i), 0))
  vrows = pl.BlockSpec((None, c, bv), lambda b, j, i: (b, at(i), j))
  state = pl.BlockSpec((None, dk, bv), lambda b, j, i: (b, 0, j))
  per_chunk_state = pl.BlockSpec((None, dk, bv), lambda b, j, i: (b, at(i), j))
  decay = pl.BlockSpec((None, None, dk, 1), lambda b, j, i: (b, at(i), 0, 0))
  return rows, vrows, state, per_chunk_state, decay


def forward(q, k, u, p, a, h0, w, opts, store_states):
  bh, t, dk = q.shape
  dv, c = u.shape[-1], opts.chunk
  n = t // c
  rows, vrows, state, per_chunk_state, decay = _specs(t, c, dk, dv, n, reverse=False)
  in_specs = [rows(dk), rows(dk), vrows, rows(c), decay, state] + [rows(dk)] * (w is not None)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_shape, out_specs = [f32(bh, t, dv), f32(bh, dk, dv)], [vrows, state]
  if store_states:
    out_shape.append(f32(bh, n * dk, dv))
    out_specs.append(per_chunk_state)
    if w is not None:
      out_shape.append(f32(bh, t, dv))
      out_specs.append(vrows)
  kernel = functools.partial(_fwd_kernel, n_chunks=n, delta=w is not None, store_states=store_states)
  args = [q, k, u, p, jnp.moveaxis(a, 2, 1)[..., None], h0] + ([w] if w is not None else [])
  return pl.pallas_call(kernel, grid=(bh, 1, n), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)], compiler_params=_params(opts),
                        interpret=_interpret(opts), name='linear_state_pass_fwd_tpu')(*args)


def reverse(q, k, p, a, do, dhT, w, opts):
  bh, t, dk = q.shape
  dv, c = do.shape[-1], opts.chunk
  n = t // c
  rows, vrows, state, per_chunk_state, decay = _specs(t, c, dk, dv, n, reverse=True)
  in_specs = [rows(dk), rows(dk), rows(c), decay, vrows, state] + [rows(dk)] * (w is not None)
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  kernel = functools.partial(_bwd_kernel, n_chunks=n, delta=w is not None)
  args = [q, k, p, jnp.moveaxis(a, 2, 1)[..., None], do, dhT] + ([w] if w is not None else [])
  return pl.pallas_call(kernel, grid=(bh, 1, n), in_specs=in_specs, out_specs=[per_chunk_state, vrows, state],
                        out_shape=[f32(bh, n * dk, dv), f32(bh, t, dv), f32(bh, dk, dv)],
                        scratch_shapes=[pltpu.VMEM((dk, dv), jnp.float32)], compiler_params=_params(opts),
                        interpret=_interpret(opts), name='linear_state_pass_bwd_tpu')(*args)

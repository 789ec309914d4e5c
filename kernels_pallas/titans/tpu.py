"""Titans' memory pass for TPUs (Mosaic TPU): one grid step per anchor batch, the batch axis sequential
("arbitrary"), the memory (W₁, W₂ and their momenta, fp32) in VMEM scratch that persists across it — 1 MB per
memory at D 128, H 512, which a TPU core's VMEM holds, where a GPU's shared memory does not — and each batch's
operands (and in the backward pass the state entering it) brought into VMEM by the block pipeline. The per-batch
arithmetic is the GPU kernel's (`kernel._fwd_step`, `kernel._bwd_step`), with the hidden units in one block.
Same operands and results as `kernel.memory_pass`; tested on CPU in TPU interpret mode."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas.titans import kernel


def _copy_when(condition, dsts, srcs):
  """Copies the state refs srcs into dsts at the grid step where `condition` holds."""
  @pl.when(condition)
  def _():
    for dst, src in zip(dsts, srcs):
      dst[...] = src[...]


def _fwd_kernel(*refs, opts, n_chunks, store):
  refs = list(refs)
  ins = [refs.pop(0) for _ in range(9)]
  initial = [refs.pop(0) for _ in range(4)]
  o_ref = refs.pop(0)
  final = [refs.pop(0) for _ in range(4)]
  stored = [refs.pop(0) for _ in range(4)] if store else None
  state, scratch = refs[:4], refs[4:]
  n = pl.program_id(1)
  _copy_when(n == 0, state, initial)
  keep = [kernel._setter(ref, i % 2 == 0) for i, ref in enumerate(stored)] if store else None
  xs = [ref[...].astype(jnp.float32) for ref in ins]
  o_ref[...] = kernel._fwd_step(opts, 1, xs, state, scratch, keep).astype(o_ref.dtype)
  _copy_when(n == n_chunks - 1, final, state)


def _bwd_kernel(*refs, opts, n_chunks):
  refs = list(refs)
  ins = [refs.pop(0) for _ in range(9)]
  entering = [refs.pop(0) for _ in range(4)]
  do_ref = refs.pop(0)
  leaving = [refs.pop(0) for _ in range(4)]
  outs = [refs.pop(0) for _ in range(9)]
  final = [refs.pop(0) for _ in range(4)]
  grads, scratch = refs[:4], refs[4:]
  n = pl.program_id(1)
  _copy_when(n == 0, grads, leaving)
  xs = [ref[...].astype(jnp.float32) for ref in ins]
  state = tuple(kernel._views(ref) for ref in entering)
  values = kernel._bwd_step(opts, 1, xs, do_ref[...].astype(jnp.float32), state, grads, scratch)
  for ref, val in zip(outs, values):
    ref[...] = val.astype(ref.dtype)
  _copy_when(n == n_chunks - 1, final, grads)


def _call(kernel_fn, opts, args, reverse, specs, scratch_rows, name):
  """pallas_call of a kernel over the grid (B·H, batches) with the state and `scratch_rows` [C, H] arrays in VMEM
  scratch. `specs(rows, whole, per_batch, states, x_dims, d)` returns (in_specs, out_specs, out_shape), given the
  spec makers, the four state shapes, the widths of the nine per-token operands and the head dim."""
  bh, t, d = args[0].shape
  h = args[9].shape[-1]
  c, n = opts.chunk, t // opts.chunk
  at = (lambda i: n - 1 - i) if reverse else (lambda i: i)
  rows = lambda x: pl.BlockSpec((None, c, x), lambda b, i: (b, at(i), 0))
  whole = lambda shape: pl.BlockSpec((None,) + shape, lambda b, i: (b, 0, 0))
  per_batch = lambda shape: pl.BlockSpec((None,) + shape, lambda b, i: (b, at(i), 0))
  states = [(d, h), (h, d), (d, h), (h, d)]
  in_specs, out_specs, out_shape = specs(rows, whole, per_batch, states, [x.shape[-1] for x in args[:9]], d)
  scratch = [pltpu.VMEM(s, jnp.float32) for s in states] + [pltpu.VMEM((c, h), jnp.float32)] * scratch_rows
  return pl.pallas_call(
      functools.partial(kernel_fn, opts=opts._replace(block=h), n_chunks=n), grid=(bh, n), in_specs=in_specs,
      out_specs=out_specs, out_shape=[jax.ShapeDtypeStruct((bh,) + s, jnp.float32) for s in out_shape],
      scratch_shapes=scratch, compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary')),
      interpret=pltpu.InterpretParams() if opts.interpret else False, name=name)


def forward(opts, args, store):
  """kernel._forward's results (o, W₁, W₂, S₁, S₂ leaving, and with `store` the stacks of states entering each
  batch) on a TPU."""
  t = args[0].shape[1]
  n = t // opts.chunk

  def specs(rows, whole, per_batch, states, x_dims, d):
    in_specs = [rows(x) for x in x_dims] + [whole(s) for s in states]
    out_specs = [rows(d)] + [whole(s) for s in states] + [per_batch(s) for s in states] * store
    out_shape = [(t, d)] + states + [(n * s[0], s[1]) for s in states] * store
    return in_specs, out_specs, out_shape

  return _call(functools.partial(_fwd_kernel, store=store), opts, args, False, specs, 2,
               'titans_memory_fwd_tpu')(*args)


def backward(opts, args, stored, do, leaving):
  """kernel._memory_bwd's gradients (of q, k, v, θ, A, B, C, D, E [BH, T, ·] and of the entering W₁, W₂, S₁, S₂)
  on a TPU, walking the batches in reverse."""
  t = args[0].shape[1]

  def specs(rows, whole, per_batch, states, x_dims, d):
    in_specs = ([rows(x) for x in x_dims] + [per_batch(s) for s in states] + [rows(d)] +
                [whole(s) for s in states])
    out_specs = [rows(x) for x in x_dims] + [whole(s) for s in states]
    out_shape = [(t, x) for x in x_dims] + states
    return in_specs, out_specs, out_shape

  return _call(_bwd_kernel, opts, args, True, specs, 5, 'titans_memory_bwd_tpu')(*args[:9], *stored, do, *leaving)

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


def _params(opts):
  return pltpu.CompilerParams(dimension_semantics=('parallel', 'arbitrary'))


def _interpret(opts):
  return pltpu.InterpretParams() if opts.interpret else False


def _fwd_kernel(*refs, opts, n_chunks, store):
  refs = list(refs)
  ins = [refs.pop(0) for _ in range(9)]
  initial = [refs.pop(0) for _ in range(4)]
  o_ref = refs.pop(0)
  final = [refs.pop(0) for _ in range(4)]
  stored = [refs.pop(0) for _ in range(4)] if store else None
  state, scratch = refs[:4], refs[4:]
  n = pl.program_id(1)

  @pl.when(n == 0)
  def _():
    for dst, src in zip(state, initial):
      dst[...] = src[...]

  keep = [kernel._setter(ref, i % 2 == 0) for i, ref in enumerate(stored)] if store else None
  xs = [ref[...].astype(jnp.float32) for ref in ins]
  o_ref[...] = kernel._fwd_step(opts, 1, xs, state, scratch, keep).astype(o_ref.dtype)

  @pl.when(n == n_chunks - 1)
  def _():
    for dst, src in zip(final, state):
      dst[...] = src[...]


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

  @pl.when(n == 0)
  def _():
    for dst, src in zip(grads, leaving):
      dst[...] = src[...]

  xs = [ref[...].astype(jnp.float32) for ref in ins]
  state = tuple(kernel._views(ref) for ref in entering)
  values = kernel._bwd_step(opts, 1, xs, do_ref[...].astype(jnp.float32), state, grads, scratch)
  for ref, val in zip(outs, values):
    ref[...] = val.astype(ref.dtype)

  @pl.when(n == n_chunks - 1)
  def _():
    for dst, src in zip(final, grads):
      dst[...] = src[...]


def _specs(n, d, h, reverse):
  """(per-batch rows of a [BH, T, X] array, the whole [BH, D, H] / [BH, H, D] state, the batch's slice of a stack
  of per-batch states [BH, N·D, H] / [BH, N·H, D])."""
  at = (lambda i: n - 1 - i) if reverse else (lambda i: i)
  rows = lambda c, x: pl.BlockSpec((None, c, x), lambda b, i: (b, at(i), 0))
  whole = lambda shape: pl.BlockSpec((None,) + shape, lambda b, i: (b, 0, 0))
  per_batch = lambda shape: pl.BlockSpec((None,) + shape, lambda b, i: (b, at(i), 0))
  return rows, whole, per_batch


def _state_shapes(d, h):
  return [(d, h), (h, d), (d, h), (h, d)]


def forward(opts, args, store):
  """kernel._forward's results (o, W₁, W₂, S₁, S₂ leaving, and with `store` the stacks of states entering each
  batch) on a TPU."""
  q = args[0]
  bh, t, d = q.shape
  h = args[9].shape[-1]
  c, n = opts.chunk, t // opts.chunk
  opts = opts._replace(block=h)
  rows, whole, per_batch = _specs(n, d, h, reverse=False)
  states = _state_shapes(d, h)
  in_specs = [rows(c, x.shape[-1]) for x in args[:9]] + [whole(s) for s in states]
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_shape = [f32(bh, t, d)] + [f32(bh, *s) for s in states]
  out_specs = [rows(c, d)] + [whole(s) for s in states]
  if store:
    out_shape += [f32(bh, n * s[0], s[1]) for s in states]
    out_specs += [per_batch(s) for s in states]
  scratch = [pltpu.VMEM(s, jnp.float32) for s in states] + [pltpu.VMEM((c, h), jnp.float32)] * 2
  kernel_fn = functools.partial(_fwd_kernel, opts=opts, n_chunks=n, store=store)
  return pl.pallas_call(kernel_fn, grid=(bh, n), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        scratch_shapes=scratch, compiler_params=_params(opts), interpret=_interpret(opts),
                        name='titans_memory_fwd_tpu')(*args)


def backward(opts, args, stored, do, leaving):
  """kernel._memory_bwd's gradients (of q, k, v, θ, A, B, C, D, E [BH, T, ·] and of the entering W₁, W₂, S₁, S₂)
  on a TPU, walking the batches in reverse."""
  q = args[0]
  bh, t, d = q.shape
  h = args[9].shape[-1]
  c, n = opts.chunk, t // opts.chunk
  opts = opts._replace(block=h)
  rows, whole, per_batch = _specs(n, d, h, reverse=True)
  states = _state_shapes(d, h)
  in_specs = ([rows(c, x.shape[-1]) for x in args[:9]] + [per_batch(s) for s in states] + [rows(c, d)] +
              [whole(s) for s in states])
  f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  out_shape = [f32(bh, t, x.shape[-1]) for x in args[:9]] + [f32(bh, *s) for s in states]
  out_specs = [rows(c, x.shape[-1]) for x in args[:9]] + [whole(s) for s in states]
  scratch = [pltpu.VMEM(s, jnp.float32) for s in states] + [pltpu.VMEM((c, h), jnp.float32)] * 5
  kernel_fn = functools.partial(_bwd_kernel, opts=opts, n_chunks=n)
  return pl.pallas_call(kernel_fn, grid=(bh, n), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                        scratch_shapes=scratch, compiler_params=_params(opts), interpret=_interpret(opts),
                        name='titans_memory_bwd_tpu')(*args[:9], *stored, do, *leaving)

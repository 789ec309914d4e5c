"""The state pass's operands from the prep kernels, for every chunked form: the (gated) delta rule and scalar decay
(kernels_pallas.linear.prep), per-channel decay (kernels_pallas.linear.channel_prep). The chunk forms call
`from_prep_kernel`, which returns the operands where the state pass runs the GPU kernel (or interprets it) and the
prep kernel takes the sizes, and None elsewhere: the chunk form then builds them in jax, which stays the kernels'
reference (the tests hold the two to 1e-5)."""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from kernels_pallas.linear import channel_prep, prep
from longctx.ops import state_pass as state_pass_paths
from longctx.ops.chunking import chunk_masks, pad_to_multiple, reset_counts


class Options(NamedTuple):
  chunk: int
  scale: float
  precision: str
  interpret: bool


def _options(chunk: int, scale: float, dtype, path: str) -> Options:
  return Options(chunk, float(scale), 'bf16' if dtype == jnp.bfloat16 else 'tf32', path == 'pallas_interpret')


def layout(x, heads, chunk):
  """[B·H, T] -> [B, H, N, C]."""
  return x.reshape(-1, heads, x.shape[-1] // chunk, chunk)


_logged: set[tuple] = set()


def _use_prep_kernel(family: str, path: str, c: int, dk: int, dv: int, platform: str) -> bool:
  """Whether the operands come from the prep kernel: where the state pass runs the GPU kernel (or interprets it)
  and the kernel takes the (padded) sizes. The choice is logged once per family and sizes."""
  use = path == 'pallas_interpret' or (path == 'pallas' and platform == 'gpu')
  ok, why = prep.supported(c, dk, dv)
  key = (family, path, platform, c, dk, dv)
  if use and key not in _logged:
    _logged.add(key)
    logging.info('%s operands: %s (chunk %d, padded head dims %d/%d)', family,
                 'prep kernel' if ok else f'jax form; prep kernel refused: {why}', c, dk, dv)
  return use and ok


def prep_inputs(q, k, v, beta, g, segment_ids, c):
  """q, k, v in one dtype padded to whole chunks and power-of-two head dims; beta (None for scalar decay)
  heads-first [B·H, T'] fp32; the gates: for one gate per head, G (the log-gates' cumulative sums within each
  chunk; zeros for g None) heads-first [B·H, T'] fp32, for per-channel gates (g [B, T, H, Dk]) the log-gates
  themselves padded like q, fp32 (the kernel sums them); the reset counts [B, T'] (None for one document)."""
  b, t, h, _ = q.shape
  dtype = jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in (q, k, v)) else jnp.float32
  pad_dim = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, state_pass_paths.padded(x.shape[-1]) - x.shape[-1])])
  q, k, v = (pad_dim(pad_to_multiple(x.astype(dtype), c)) for x in (q, k, v))
  heads_first = lambda x: jnp.swapaxes(pad_to_multiple(x.astype(jnp.float32), c), 1, 2).reshape(b * h, -1)
  if g is not None and g.ndim == 4:
    G = pad_dim(pad_to_multiple(g.astype(jnp.float32), c))
  elif g is None:   # no gate (DeltaNet): zeros, not a cumulative sum of zeros the compiler would fold at every length
    G = jnp.zeros((b * h, q.shape[1]), jnp.float32)
  else:
    G = jnp.cumsum(layout(heads_first(g), h, c), axis=-1).reshape(b * h, -1)
  return q, k, v, None if beta is None else heads_first(beta), G, reset_counts(segment_ids, c)


def _per_channel(G) -> bool:
  """Whether `prep_inputs` gave per-channel log-gates [B, T', H, Dk'] (else cumulative gates [B·H, T'])."""
  return G.ndim == 4


def _prepare(q, k, v, beta, G, count, opts, store_inverse):
  if _per_channel(G):
    return channel_prep.prepare(q, k, v, G, count, chunk=opts.chunk, scale=opts.scale, precision=opts.precision,
                                 interpret=opts.interpret)
  return prep.prepare(q, k, v, beta, G, count, chunk=opts.chunk, scale=opts.scale, precision=opts.precision,
                      store_inverse=store_inverse, interpret=opts.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def operands(q, k, v, beta, G, count, opts):
  """The prep kernel's operands, heads-first [B·H, T, ·]: (Q_start, K_end, U_tilde, P, W) for the delta rule,
  (Q_start, K_end, V, P) for scalar and per-channel decay (beta None; G as `prep_inputs` gives it); the gradient
  through the prep gradient kernels."""
  return _prepare(q, k, v, beta, G, count, opts, False)


def _operands_fwd(q, k, v, beta, G, count, opts):
  out = _prepare(q, k, v, beta, G, count, opts, True)
  *out, X = out if beta is not None else (*out, None)     # the delta rule's forward also stores (I + A)⁻¹
  return tuple(out), (q, k, v, beta, G, count, X)


def _operands_bwd(opts, res, grads):
  *inputs, X = res
  if _per_channel(inputs[4]):
    q, k, v, _, g, count = inputs
    dq, dk, dv, dg = channel_prep.gradients(q, k, v, g, count, grads, chunk=opts.chunk, scale=opts.scale,
                                            precision=opts.precision, interpret=opts.interpret)
    return dq, dk, dv, None, dg, None
  grads = prep.gradients(*inputs, X, grads, chunk=opts.chunk, scale=opts.scale, precision=opts.precision,
                         interpret=opts.interpret)
  return tuple(grads) + (None,)


operands.defvjp(_operands_fwd, _operands_bwd)


def from_prep_kernel(family: str, q, k, v, beta, g, segment_ids, *, chunk: int, scale: float, kernel: str):
  """For q, k, v [B, T, H, ·], beta (None for scalar and per-channel decay), g [B, T, H] or per channel
  [B, T, H, Dk] (None: no gate) and segment ids [B, T]: (the state pass's operands [B, H, N, C, ·] at power-of-two
  head dims, each chunk's state decay [B, H, N] or [B, H, N, Dk']) from the prep kernel, or None where it does not
  apply."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  platform = jax.default_backend()
  path = state_pass_paths.choose(kernel, platform=platform, chunk=chunk, dk=dk, dv=dv)
  if not _use_prep_kernel(family, path, chunk, state_pass_paths.padded(dk), state_pass_paths.padded(dv), platform):
    return None
  q, k, v, beta, G, count = prep_inputs(q, k, v, beta, g, segment_ids, chunk)
  opts = _options(chunk, scale, q.dtype, path)
  out = tuple(x.reshape(b, h, -1, chunk, x.shape[-1]) for x in operands(q, k, v, beta, G, count, opts))
  reaches_end = chunk_masks(count, chunk)[1][..., -1]          # the incoming state reaches the chunk's end
  if _per_channel(G):   # e^{G_C}, the chunk's gates summed
    G_end = jnp.moveaxis(G.reshape(b, -1, chunk, h, G.shape[-1]).sum(axis=2), 2, 1)
    return out, jnp.where(reaches_end[..., None], jnp.exp(G_end), 0.0)
  return out, jnp.where(reaches_end, jnp.exp(layout(G, h, chunk)[..., -1]), 0.0)


def chunked_form(family: str, q, k, v, beta, g, segment_ids, initial_state, *, chunk: int, scale: float, kernel: str,
                 jax_operands):
  """One family's chunked form from its operands to its output: the operands from the prep kernel where it applies
  (`from_prep_kernel`), else `jax_operands()` -> (operands, state decay) in the same layout; then the state pass.
  Returns (o [B, T, H, Dv] in v's dtype, final state [B, H, Dk, Dv] fp32)."""
  t, dk, dv = q.shape[1], q.shape[-1], v.shape[-1]
  operands, state_decay = (from_prep_kernel(family, q, k, v, beta, g, segment_ids, chunk=chunk, scale=scale,
                                            kernel=kernel) or jax_operands())
  o, state = state_pass_paths.state_pass(*operands[:4], state_decay, initial_state, *operands[4:],
                                         kernel_name=kernel, out_dtype=v.dtype)
  return o[:, :t, :, :dv], state[..., :dk, :dv]

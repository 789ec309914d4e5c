"""Chunkwise-parallel gated delta rule (the WY/UT form of Yang et al. 2024/2025), fp32 states.

Within a chunk of C tokens with cumulative log-gates G (γ = e^G) and the incoming state S:
    A = strictLower(diag(β) (Γ ⊙ K Kᵀ)),  Γ_ij = e^{G_i − G_j}
    T = (I + A)⁻¹ diag(β),   W = T (γ ⊙ K),   Ũ = T V                      (no dependence on S: all chunks at once)
    U = Ũ − W S                                                          (the per-token corrections)
    O = (scale · Q ⊙ γ) S + (scale · Q Kᵀ ⊙ Γ ⊙ M) U                        (M: j ≤ i)
    S ← e^{G_C} S + (K ⊙ e^{G_C − G})ᵀ U
Only the last three lines run in the sequential pass over chunks (`longctx.ops.state_pass`, a Pallas kernel
where it applies). Where the state pass runs the GPU kernel, everything before it is one Pallas kernel too
(kernels_pallas.linear.delta_prep: reads Q, K, V in place, writes the state pass's operands in the input dtype),
with a gradient kernel of its own (from each chunk's stored (I + A)⁻¹); elsewhere (I + A)⁻¹ is
`longctx.ops.triangular`. Document starts zero Γ across them and cut the incoming state off (see
longctx.ops.chunking), which is exact where a −∞ gate would make G − G undefined.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from absl import logging

from kernels_pallas.linear import delta_prep
from longctx.ops import state_pass as state_pass_paths
from longctx.ops import triangular
from longctx.ops.chunking import chunk_masks, chunked_inputs, pad_to_multiple, reset_counts, unchunk
from longctx.ops.state_pass import state_pass


def _operands(q, k, v, beta, G, masks, scale, inverse):
  """The state pass's operands from heads-first [B, H, N, C, ·] inputs and chunk-local cumulative log-gates G:
  (Q_start, K_end, U_tilde, P, W)."""
  same, from_start, to_end = masks
  c = q.shape[-2]
  causal = jnp.tril(jnp.ones((c, c), bool))
  gamma = jnp.where(causal & same, jnp.exp(jnp.where(causal, G[..., :, None] - G[..., None, :], 0.0)), 0.0)
  gamma_start = jnp.where(from_start, jnp.exp(G), 0.0)
  A = jnp.where(jnp.tril(causal, -1), beta[..., :, None] * gamma * jnp.einsum('...id,...jd->...ij', k, k), 0.0)
  T = triangular.unit_lower_inverse(A, inverse)
  W = jnp.einsum('...ij,...jd->...id', T, beta[..., None] * gamma_start[..., None] * k)
  U_tilde = jnp.einsum('...ij,...jd->...id', T, beta[..., None] * v)
  qs = q * scale
  P = jnp.einsum('...id,...jd->...ij', qs, k) * gamma
  Q_start = qs * gamma_start[..., None]
  K_end = k * jnp.where(to_end, jnp.exp(G[..., -1:] - G), 0.0)[..., None]
  return Q_start, K_end, U_tilde, P, W


class _Prep(NamedTuple):
  chunk: int
  scale: float
  precision: str
  interpret: bool


def _layout(x, heads, chunk):
  """[B·H, T] -> [B, H, N, C]."""
  return x.reshape(-1, heads, x.shape[-1] // chunk, chunk)


def _prep(q, k, v, beta, G, count, opts, store_inverse):
  return delta_prep.prepare(q, k, v, beta, G, count, chunk=opts.chunk, scale=opts.scale, precision=opts.precision,
                            store_inverse=store_inverse, interpret=opts.interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _kernel_operands(q, k, v, beta, G, count, opts):
  """The prep kernel's (Q_start, K_end, U_tilde, P, W), heads-first [B·H, T, ·], with its gradient kernel."""
  return _prep(q, k, v, beta, G, count, opts, False)


def _jax_operands(q, k, v, beta, G, count, opts):
  """`_kernel_operands` in plain jax (the reference the kernels are tested against)."""
  b, t, h, _ = q.shape
  c = opts.chunk
  (q, k, v), masks = chunked_inputs((q, k, v), None, c)
  out = _operands(q, k, v, _layout(beta, h, c), _layout(G, h, c), chunk_masks(count, c), opts.scale, 'jax')
  return tuple(x.reshape(b * h, t, x.shape[-1]).astype(q.dtype) for x in out)


def _kernel_operands_fwd(q, k, v, beta, G, count, opts):
  *operands, X = _prep(q, k, v, beta, G, count, opts, True)
  return tuple(operands), (q, k, v, beta, G, count, X)


def _kernel_operands_bwd(opts, res, grads):
  *inputs, X = res
  grads = delta_prep.gradients(*inputs, X, grads, chunk=opts.chunk, scale=opts.scale, precision=opts.precision,
                               interpret=opts.interpret)
  return tuple(grads) + (None,)


_kernel_operands.defvjp(_kernel_operands_fwd, _kernel_operands_bwd)

_logged: set[tuple] = set()


def _use_prep_kernel(path: str, c: int, dk: int, dv: int, platform: str) -> bool:
  """Whether the operands come from the prep kernel: where the state pass runs the GPU kernel (or interprets it)
  and the kernel takes the (padded) sizes."""
  use = path == 'pallas_interpret' or (path == 'pallas' and platform == 'gpu')
  ok, why = delta_prep.supported(c, dk, dv)
  key = (path, platform, c, dk, dv)
  if use and key not in _logged:
    _logged.add(key)
    logging.info('delta-rule operands: %s (chunk %d, padded head dims %d/%d)',
                 'prep kernel' if ok else f'jax form; prep kernel refused: {why}', c, dk, dv)
  return use and ok


def _prep_kernel_inputs(q, k, v, beta, g, segment_ids, c):
  """q, k, v in one dtype padded to whole chunks and power-of-two head dims; beta and G heads-first [B·H, T']
  fp32; the reset counts [B, T'] (None for one document)."""
  b, t, h, _ = q.shape
  dtype = jnp.bfloat16 if all(x.dtype == jnp.bfloat16 for x in (q, k, v)) else jnp.float32
  pad_dim = lambda x: jnp.pad(x, [(0, 0)] * 3 + [(0, state_pass_paths.padded(x.shape[-1]) - x.shape[-1])])
  q, k, v = (pad_dim(pad_to_multiple(x.astype(dtype), c)) for x in (q, k, v))
  heads_first = lambda x: jnp.swapaxes(pad_to_multiple(x.astype(jnp.float32), c), 1, 2).reshape(b * h, -1)
  G = jnp.cumsum(_layout(heads_first(g), h, c), axis=-1).reshape(b * h, -1)
  return q, k, v, heads_first(beta), G, reset_counts(segment_ids, c)


def delta_rule(q, k, v, beta, g=None, *, initial_state=None, segment_ids=None, scale=None, chunk_size=64,
               kernel='auto'):
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  c = min(chunk_size, t)
  out_dtype = v.dtype
  g = jnp.zeros((b, t, h), jnp.float32) if g is None else g
  platform = jax.default_backend()
  pk, pv = state_pass_paths.padded(dk), state_pass_paths.padded(dv)
  path = state_pass_paths.choose(kernel, platform=platform, chunk=c, dk=dk, dv=dv)
  if _use_prep_kernel(path, c, pk, pv, platform):
    q, k, v, beta, G, count = _prep_kernel_inputs(q, k, v, beta, g, segment_ids, c)
    opts = _Prep(c, float(scale), 'bf16' if q.dtype == jnp.bfloat16 else 'tf32', path == 'pallas_interpret')
    operands = tuple(x.reshape(b, h, -1, c, x.shape[-1]) for x in _kernel_operands(q, k, v, beta, G, count, opts))
    G = _layout(G, h, c)
    from_start = chunk_masks(count, c)[1]
  else:
    (q, k, v, beta, g), (same, from_start, to_end) = chunked_inputs((q, k, v, beta, g), segment_ids, c)
    G = jnp.cumsum(g, axis=-1)
    operands = _operands(q, k, v, beta, G, (same, from_start, to_end), scale, triangular.choose(kernel, c, platform))
  state_decay = jnp.where(from_start[..., -1], jnp.exp(G[..., -1]), 0.0)   # [B, H, N]
  o, state = state_pass(*operands[:4], state_decay, initial_state, operands[4], kernel_name=kernel)
  return unchunk(o[..., :dv], t).astype(out_dtype), state[..., :dk, :dv]

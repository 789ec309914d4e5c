"""Chunkwise-parallel scalar-decay linear attention (RetNet's chunkwise form; Mamba2's SSD), fp32 states.

Within a chunk with cumulative log-decays G (γ = e^G) and incoming state S:
    O = (scale · Q ⊙ γ) S + (scale · Q Kᵀ ⊙ Γ ⊙ M) V,     Γ_ij = e^{G_i − G_j},  M: j ≤ i
    S ← e^{G_C} S + (K ⊙ e^{G_C − G})ᵀ V
The masked scores need no state and are computed for all chunks at once; the pass over chunks
(`longctx.ops.state_pass`, a Pallas kernel where it applies) carries S. Where the state pass runs the GPU kernel,
the scores and the gated Q and K are one Pallas kernel too (kernels_pallas.linear.prep, with a gradient kernel of
its own), reading Q, K, V in place and writing the state pass's operands in the input dtype.
"""
from __future__ import annotations

import jax.numpy as jnp

from longctx.ops import kernel_operands
from longctx.ops.chunking import chunk_masks, chunked_inputs
from longctx.ops.kernel_operands import layout


def _operands(q, k, v, G, masks, scale):
  """The state pass's operands from heads-first [B, H, N, C, ·] inputs and chunk-local cumulative log-decays G
  [B, H, N, C]: (Q_start, K_end, V, P)."""
  same, from_start, to_end = masks
  c = q.shape[-2]
  causal = jnp.tril(jnp.ones((c, c), bool))
  gamma = jnp.where(causal & same, jnp.exp(jnp.where(causal, G[..., :, None] - G[..., None, :], 0.0)), 0.0)
  qs = q * scale
  P = jnp.einsum('...id,...jd->...ij', qs, k) * gamma
  Q_start = qs * jnp.where(from_start, jnp.exp(G), 0.0)[..., None]
  K_end = k * jnp.where(to_end, jnp.exp(G[..., -1:] - G), 0.0)[..., None]
  return Q_start, K_end, v, P


def _jax_operands(q, k, v, beta, G, count, opts):
  """`kernel_operands.operands` in plain jax (the reference the kernels are tested against); beta is None."""
  b, t, h, _ = q.shape
  c = opts.chunk
  (q, k, v), masks = chunked_inputs((q, k, v), None, c)
  out = _operands(q, k, v, layout(G, h, c), chunk_masks(count, c), opts.scale)
  return tuple(x.reshape(b * h, t, x.shape[-1]).astype(q.dtype) for x in out)


def scalar_decay(q, k, v, g, *, initial_state=None, segment_ids=None, scale=None, chunk_size=64,
                 kernel='auto'):
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  c = min(chunk_size, q.shape[1])

  def jax_operands():
    (qc, kc, vc, gc), (same, from_start, to_end) = chunked_inputs((q, k, v, g), segment_ids, c)
    G = jnp.cumsum(gc, axis=-1)
    operands = _operands(qc, kc, vc, G, (same, from_start, to_end), scale)
    return operands, jnp.where(from_start[..., -1], jnp.exp(G[..., -1]), 0.0)          # state decay [B, H, N]

  return kernel_operands.chunked_form('scalar-decay', q, k, v, None, g, segment_ids, initial_state, chunk=c,
                                      scale=scale, kernel=kernel, jax_operands=jax_operands)

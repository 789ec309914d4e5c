"""Chunkwise-parallel scalar-decay linear attention (RetNet's chunkwise form; Mamba2's SSD), fp32 states.

Within a chunk with cumulative log-decays G (γ = e^G) and incoming state S:
    O = (scale · Q ⊙ γ) S + (scale · Q Kᵀ ⊙ Γ ⊙ M) V,     Γ_ij = e^{G_i − G_j},  M: j ≤ i
    S ← e^{G_C} S + (K ⊙ e^{G_C − G})ᵀ V
The masked scores need no state and are computed for all chunks at once; the pass over chunks
(`longctx.ops.state_pass`, a Pallas kernel where it applies) carries S.
"""
from __future__ import annotations

import jax.numpy as jnp

from longctx.ops.chunking import chunked_inputs, unchunk
from longctx.ops.state_pass import state_pass


def scalar_decay(q, k, v, g, *, initial_state=None, segment_ids=None, scale=None, chunk_size=64,
                 kernel='auto'):
  b, t, h, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  c = min(chunk_size, t)
  out_dtype = v.dtype
  (q, k, v, g), (same, from_start, to_end) = chunked_inputs((q, k, v, g), segment_ids, c)

  causal = jnp.tril(jnp.ones((c, c), bool))
  G = jnp.cumsum(g, axis=-1)
  gamma = jnp.where(causal & same, jnp.exp(jnp.where(causal, G[..., :, None] - G[..., None, :], 0.0)), 0.0)
  qs = q * scale
  P = jnp.einsum('...id,...jd->...ij', qs, k) * gamma
  Q_start = qs * jnp.where(from_start, jnp.exp(G), 0.0)[..., None]
  K_end = k * jnp.where(to_end, jnp.exp(G[..., -1:] - G), 0.0)[..., None]
  state_decay = jnp.where(from_start[..., -1], jnp.exp(G[..., -1]), 0.0)   # [B, H, N]
  o, state = state_pass(Q_start, K_end, v, P, state_decay, initial_state, kernel_name=kernel)
  return unchunk(o, t).astype(out_dtype), state

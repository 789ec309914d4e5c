"""Chunkwise-parallel gated delta rule (the WY/UT form of Yang et al. 2024/2025), fp32 states.

Within a chunk of C tokens with cumulative log-gates G (γ = e^G) and the incoming state S:
    A = strictLower(diag(β) (Γ ⊙ K Kᵀ)),  Γ_ij = e^{G_i − G_j}
    T = (I + A)⁻¹ diag(β),   W = T (γ ⊙ K),   Ũ = T V                      (no dependence on S: all chunks at once)
    U = Ũ − W S                                                          (the per-token corrections)
    O = (scale · Q ⊙ γ) S + (scale · Q Kᵀ ⊙ Γ ⊙ M) U                        (M: j ≤ i)
    S ← e^{G_C} S + (K ⊙ e^{G_C − G})ᵀ U
Only the last three lines run in the sequential pass over chunks (`longctx.ops.state_pass`, a Pallas kernel
where it applies); (I + A)⁻¹ is `longctx.ops.triangular` (a Pallas kernel on GPU). Document starts zero Γ across them and cut the incoming state off (see longctx.ops.chunking),
which is exact where a −∞ gate would make G − G undefined.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx.ops import triangular
from longctx.ops.chunking import chunked_inputs, unchunk
from longctx.ops.state_pass import state_pass


def delta_rule(q, k, v, beta, g=None, *, initial_state=None, segment_ids=None, scale=None, chunk_size=64,
               kernel='auto'):
  b, t, h, dk = q.shape
  scale = dk ** -0.5 if scale is None else scale
  c = min(chunk_size, t)
  out_dtype = v.dtype
  g = jnp.zeros((b, t, h), jnp.float32) if g is None else g
  (q, k, v, beta, g), (same, from_start, to_end) = chunked_inputs((q, k, v, beta, g), segment_ids, c)

  causal = jnp.tril(jnp.ones((c, c), bool))
  G = jnp.cumsum(g, axis=-1)
  gamma = jnp.where(causal & same, jnp.exp(jnp.where(causal, G[..., :, None] - G[..., None, :], 0.0)), 0.0)
  gamma_start = jnp.where(from_start, jnp.exp(G), 0.0)
  A = jnp.where(jnp.tril(causal, -1), beta[..., :, None] * gamma * jnp.einsum('...id,...jd->...ij', k, k), 0.0)
  T = triangular.unit_lower_inverse(A, triangular.choose(kernel, c, jax.default_backend()))
  W = jnp.einsum('...ij,...jd->...id', T, beta[..., None] * gamma_start[..., None] * k)
  U_tilde = jnp.einsum('...ij,...jd->...id', T, beta[..., None] * v)
  qs = q * scale
  P = jnp.einsum('...id,...jd->...ij', qs, k) * gamma
  Q_start = qs * gamma_start[..., None]
  K_end = k * jnp.where(to_end, jnp.exp(G[..., -1:] - G), 0.0)[..., None]
  state_decay = jnp.where(from_start[..., -1], jnp.exp(G[..., -1]), 0.0)   # [B, H, N]
  o, state = state_pass(Q_start, K_end, U_tilde, P, state_decay, initial_state, W, kernel_name=kernel)
  return unchunk(o, t).astype(out_dtype), state

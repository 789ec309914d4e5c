"""Chunkwise-parallel gated delta rule (the WY/UT form of Yang et al. 2024/2025), fp32 states.

Within a chunk of C tokens with cumulative log-gates G (γ = e^G) and the incoming state S:
    A = strictLower(diag(β) (Γ ⊙ K Kᵀ)),  Γ_ij = e^{G_i − G_j}
    T = (I + A)⁻¹ diag(β),   W = T (γ ⊙ K),   Ũ = T V                      (no dependence on S: all chunks at once)
    U = Ũ − W S                                                          (the per-token corrections)
    O = (scale · Q ⊙ γ) S + (scale · Q Kᵀ ⊙ Γ ⊙ M) U                        (M: j ≤ i)
    S ← e^{G_C} S + (K ⊙ e^{G_C − G})ᵀ U
Only the last three lines run in the sequential pass over chunks (`longctx.ops.state_pass`, a Pallas kernel
where it applies). Where the state pass runs the GPU kernel, everything before it is one Pallas kernel too
(kernels_pallas.linear.prep: reads Q, K, V in place, writes the state pass's operands in the input dtype),
with a gradient kernel of its own (from each chunk's stored (I + A)⁻¹); elsewhere (I + A)⁻¹ is
`longctx.ops.triangular`. Document starts zero Γ across them and cut the incoming state off (see
longctx.ops.chunking), which is exact where a −∞ gate would make G − G undefined.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from longctx.ops import kernel_operands
from longctx.ops import triangular
from longctx.ops.chunking import chunk_masks, chunked_inputs
from longctx.ops.kernel_operands import layout


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


def _jax_operands(q, k, v, beta, G, count, opts):
  """`kernel_operands.operands` in plain jax (the reference the kernels are tested against)."""
  b, t, h, _ = q.shape
  c = opts.chunk
  (q, k, v), masks = chunked_inputs((q, k, v), None, c)
  out = _operands(q, k, v, layout(beta, h, c), layout(G, h, c), chunk_masks(count, c), opts.scale, 'jax')
  return tuple(x.reshape(b * h, t, x.shape[-1]).astype(q.dtype) for x in out)


def delta_rule(q, k, v, beta, g=None, *, initial_state=None, segment_ids=None, scale=None, chunk_size=64,
               kernel='auto'):
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  c = min(chunk_size, q.shape[1])

  def jax_operands():
    chunked, (same, from_start, to_end) = chunked_inputs((q, k, v, beta) + (() if g is None else (g,)),
                                                         segment_ids, c)
    G = jnp.zeros_like(chunked[3]) if g is None else jnp.cumsum(chunked[4], axis=-1)   # no gate: no sum to fold
    inverse = triangular.choose(kernel, c, jax.default_backend())
    operands = _operands(*chunked[:4], G, (same, from_start, to_end), scale, inverse)
    return operands, jnp.where(from_start[..., -1], jnp.exp(G[..., -1]), 0.0)         # state decay [B, H, N]

  return kernel_operands.chunked_form('delta-rule', q, k, v, beta, g, segment_ids, initial_state, chunk=c,
                                      scale=scale, kernel=kernel, jax_operands=jax_operands)

"""Parallel forms of the per-channel decay recurrences, fp32 states.

`channel_decay` (GLA's chunkwise form with secondary chunking). With inclusive cumulative log-gates G inside a
chunk (G ≤ 0, decreasing), the decay that carries k_j to position i ≥ j is e^{G_i − G_j}, one factor per key
channel, so the intra-chunk scores A_ij = Σ_d q_id k_jd e^{G_id − G_jd} are no plain matmul. The chunk is cut into
sub-chunks of `sub_chunk` tokens:
  * keys in earlier sub-chunks than the query's: both factors taken relative to the query sub-chunk's start r,
    (q_i e^{G_i − G_r}) · (k_j e^{G_r − G_j}), each exponent ≤ 0, so nothing overflows and the product is a matmul;
  * keys in the query's own sub-chunk: e^{G_i − G_j} element by element, j ≤ i only, on [s, s, Dk] blocks.
Across chunks, as for the scalar decay:  O += (scale · Q ⊙ e^G) S,   S ← e^{G_C} ⊙ S + (K ⊙ e^{G_C − G})ᵀ V.
The intra-chunk scores are recomputed in the backward pass (`jax.checkpoint`); the pass over chunks is
`longctx.ops.state_pass` (a Pallas kernel where it applies). Where the state pass runs the GPU kernel, the scores and
the gated Q and K come from one Pallas kernel too (kernels_pallas.linear.channel_prep, sub-chunks of 16, with a
gradient kernel of its own), which reads the inputs in place and sums the gates itself.

`vector_decay` (HGRN): h_t = e^{g_t} h_{t−1} + x_t is an associative recurrence over pairs (a, b) ∘ (a', b') =
(a a', a' b + b'); `lax.associative_scan` evaluates it in log depth with exact gradients by autodiff.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from kernels_pallas.linear import channel_prep
from longctx.ops import kernel_operands
from longctx.ops.chunking import chunk_masks, chunked_inputs, resets


def _masked_exp(mask, exponent):
  """e^exponent where mask, else 0, with finite gradients where the mask is off."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


@functools.partial(jax.checkpoint, static_argnums=(3,))
def _intra_scores(q, k, G, sub):
  """A [..., C, C]: Σ_d q_id k_jd e^{G_id − G_jd} for j ≤ i (0 above the diagonal). q, k, G [..., C, Dk]."""
  c, dk = q.shape[-2:]
  ns = c // sub
  lead = q.shape[:-2]
  split = lambda x: x.reshape(lead + (ns, sub, dk))
  qs, ks, Gs = split(q), split(k), split(G)
  # Reference r_a: the cumulative gate just before sub-chunk a (0 at the chunk start).
  ref = jnp.concatenate([jnp.zeros_like(Gs[..., :1, -1, :]), Gs[..., :-1, -1, :]], axis=-2)   # [..., ns, Dk]
  q_rel = qs * jnp.exp(Gs - ref[..., None, :])                                                   # [..., ns, s, Dk]
  earlier = np.arange(c)[None, :] < (np.arange(ns) * sub)[:, None]                               # [ns, C]
  k_rel = k[..., None, :, :] * _masked_exp(earlier[..., None], ref[..., :, None, :] - G[..., None, :, :])
  off = jnp.einsum('...asd,...ajd->...asj', q_rel, k_rel).reshape(lead + (c, c))
  tril = np.tril(np.ones((sub, sub), bool))[..., None]
  decay = _masked_exp(tril, Gs[..., :, None, :] - Gs[..., None, :, :])                          # [..., ns, s, s, Dk]
  diag = jnp.einsum('...id,...jd,...ijd->...ij', qs, ks, decay)                                 # [..., ns, s, s]
  diag = jnp.einsum('...aij,ab->...aibj', diag, jnp.eye(ns, dtype=diag.dtype)).reshape(lead + (c, c))
  return off + diag


def _operands(q, k, v, G, masks, scale, sub):
  """The state pass's operands from heads-first [B, H, N, C, ·] inputs and chunk-local cumulative log-gates G
  [B, H, N, C, Dk]: (Q_start, K_end, V, P)."""
  same, from_start, to_end = masks
  qs = q * scale
  P = jnp.where(same, _intra_scores(qs, k, G, sub), 0.0)
  Q_start = qs * jnp.where(from_start[..., None], jnp.exp(G), 0.0)
  K_end = k * _masked_exp(to_end[..., None], G[..., -1:, :] - G)
  return Q_start, K_end, v, P


def _jax_operands(q, k, v, beta, g, count, opts):
  """`kernel_operands.operands` in plain jax (the reference the kernel is tested against); beta is None, g the
  per-channel log-gates in the tokens' layout."""
  b, t, h, _ = q.shape
  c = opts.chunk
  (q, k, v, g), _ = chunked_inputs((q, k, v, g), None, c)
  out = _operands(q, k, v, jnp.cumsum(g, axis=-2), chunk_masks(count, c), opts.scale, min(channel_prep.SUB, c))
  return tuple(x.reshape(b * h, t, x.shape[-1]).astype(q.dtype) for x in out)


def channel_decay(q, k, v, g, *, initial_state=None, segment_ids=None, scale=None, chunk_size=64, sub_chunk=16,
                  kernel='auto'):
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  c = min(chunk_size, q.shape[1])
  sub = min(sub_chunk, c)
  c = -(-c // sub) * sub

  def jax_operands():
    (qc, kc, vc, gc), (same, from_start, to_end) = chunked_inputs((q, k, v, g), segment_ids, c)
    G = jnp.cumsum(gc, axis=-2)                                                       # [B, H, N, C, Dk]
    operands = _operands(qc, kc, vc, G, (same, from_start, to_end), scale, sub)
    return operands, jnp.where(from_start[..., -1, None], jnp.exp(G[..., -1, :]), 0.0)   # [B, H, N, Dk]

  return kernel_operands.chunked_form('channel-decay', q, k, v, None, g, segment_ids, initial_state, chunk=c,
                                      scale=scale, kernel=kernel, jax_operands=jax_operands)


def vector_decay(x, g, *, initial_state=None, segment_ids=None):
  """x, g [B, T, D]; initial_state [B, D]. Returns (h [B, T, D], final h fp32)."""
  b, t, d = x.shape
  reset = resets(segment_ids, t, b)[..., None]
  decay = jnp.where(reset, 0.0, jnp.exp(g.astype(jnp.float32)))
  xf = x.astype(jnp.float32)
  if initial_state is not None:
    # The initial state enters as the first step's input: h_0 = α_0 s + x_0.
    xf = xf.at[:, 0].add(decay[:, 0] * initial_state.astype(jnp.float32))

  def combine(left, right):
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2

  _, hs = jax.lax.associative_scan(combine, (decay, xf), axis=1)
  return hs.astype(x.dtype), hs[:, -1]

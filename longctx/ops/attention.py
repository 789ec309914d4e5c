"""Causal softmax attention with GQA, an optional left window and packed-document segment ids.

Query t sees key s when  s <= t,  t - s < window (if window > 0)  and  segment[t] == segment[s].
Arrays are [batch, time, heads, head_dim]; kv heads divide query heads (GQA).

Paths, equal up to floating-point rounding:
  naive    the reference: full fp32 score matrix.
  xla      `jax.nn.dot_product_attention(implementation='xla')`.
  cudnn    cuDNN flash attention (GPU, 16-bit inputs). Packed rows go to cuDNN as ragged sequences (each row's
           segment starts and lengths, at most `max_segments` of them); a batch with a row holding more segments
           than that takes the chunked path instead, so results never depend on the data.
  chunked  online softmax over key chunks (Rabe & Staats; FlashAttention-2's recurrences), memory linear in
           length, fully masked chunks skipped; its backward is a custom_vjp that recomputes scores chunk by chunk
           from the saved output and log-sum-exp instead of storing them.
`attention` picks one (`choose_impl`) by platform, dtype and shape, and logs the choice once.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from absl import logging

# Above this length the xla path's [B, H, T, T] scores cost more memory than they save in speed.
XLA_MAX_LEN = 2048
_MASKED = -1e30  # finite, so that a row whose every key in a chunk is masked yields exp(-inf - -inf) = nan nowhere
_chosen: dict[tuple, str] = {}


def _allowed(q_idx, k_idx, seg_q, seg_k, window):
  """[B, Tq, Tk] boolean mask from query/key positions ([Tq], [Tk] shared by the batch, or [B, Tq], [B, Tk]) and
  segment ids [B, Tq], [B, Tk]."""
  ok = k_idx[..., None, :] <= q_idx[..., :, None]
  if window:
    ok = ok & (q_idx[..., :, None] - k_idx[..., None, :] < window)
  return ok & (seg_q[:, :, None] == seg_k[:, None, :])


def _segments(segment_ids, batch, length):
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  return segment_ids.astype(jnp.int32)


def naive(q, k, v, segment_ids=None, *, window=0, scale=None):
  """Reference: materialises the fp32 [B, KV, G, T, T] scores."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  qf = q.astype(jnp.float32).reshape(b, t, kv, h // kv, d)
  s = jnp.einsum('btkgd,bskd->bkgts', qf, k.astype(jnp.float32)) * scale
  seg = _segments(segment_ids, b, t)
  idx = jnp.arange(t)
  mask = _allowed(idx, idx, seg, seg, window)[:, None, None]
  p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
  o = jnp.einsum('bkgts,bskd->btkgd', p, v.astype(jnp.float32))
  return o.reshape(b, t, h, d).astype(q.dtype)


def segment_offsets(segment_ids, max_segments: int):
  """Runs of equal id in each row as (starts [B, M+1], lengths [B, M], overflow [B]), -1 padded.

  `overflow` marks rows with more than `max_segments` runs, whose tail the first two do not cover.
  """
  b, t = segment_ids.shape
  is_start = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  first = jax.vmap(lambda s: jnp.nonzero(s, size=max_segments + 1, fill_value=t)[0])(is_start)
  lengths = first[:, 1:] - first[:, :-1]
  starts = jnp.where(first < t, first, -1).astype(jnp.int32)
  return starts, jnp.where(lengths > 0, lengths, -1).astype(jnp.int32), jnp.sum(is_start, axis=1) > max_segments


def cudnn_packed(q, k, v, segment_ids, *, window=0, scale=None, max_segments=64, chunk_size=512):
  """cuDNN attention over packed rows (each segment its own causal sequence), chunked where a row overflows."""
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # the ragged (packed) form is not public API
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  starts, lengths, overflow = segment_offsets(segment_ids, max_segments)

  def fast(q, k, v):
    return cudnn.dot_product_attention(
        q, k, v, q_seqlen=lengths, kv_seqlen=lengths, q_offsets=starts, kv_offsets=starts, scale=scale,
        mask_type=cudnn.MaskType.PADDING_CAUSAL, sliding_window_length=window or None)

  def safe(q, k, v):
    return chunked(q, k, v, segment_ids, window=window, scale=scale, chunk_size=chunk_size)

  return jax.lax.cond(jnp.any(overflow), safe, fast, q, k, v)


def library(q, k, v, segment_ids=None, *, window=0, scale=None, implementation='xla'):
  """`jax.nn.dot_product_attention`; segments as a boolean mask (xla; cuDNN takes them through `cudnn_packed`)."""
  t = q.shape[1]
  mask = None
  if segment_ids is not None:
    mask = (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return jax.nn.dot_product_attention(
      q, k, v, mask=mask, scale=scale, is_causal=True,
      local_window_size=(window - 1, 0) if window and window < t else None,
      implementation=implementation)


def cached(q, k_cache, v_cache, start, *, window=0, scale=None, prefix=None):
  """Queries at cache positions start, start+1, ... against a KV cache [B, S, KV, D] already holding them (decoding).

  Key j is seen by the query at position i when j <= i (and i − j < window); fp32 scores, one document. `prefix`
  (keys, values [B, P, KV, D]) is seen by every query, as in `prefixed`.
  """
  t, s = q.shape[1], k_cache.shape[1]
  q_idx = start + jnp.arange(t)
  k_idx = jnp.arange(s)
  mask = k_idx[None, :] <= q_idx[:, None]
  if window:
    mask = mask & (q_idx[:, None] - k_idx[None, :] < window)
  mask = mask[None]
  if prefix is not None:
    pk, pv = prefix
    k_cache = jnp.concatenate([pk.astype(k_cache.dtype), k_cache], axis=1)
    v_cache = jnp.concatenate([pv.astype(v_cache.dtype), v_cache], axis=1)
    mask = jnp.concatenate([jnp.ones((1, t, pk.shape[1]), bool), mask], axis=-1)
  return masked(q, k_cache, v_cache, mask, scale=scale)


def masked(q, k, v, mask, *, scale=None):
  """Dense softmax attention of q [B, Tq, H, D] over k, v [B, Tk, KV, D] under an explicit boolean mask, one for
  all heads [B or 1, Tq, Tk] or one per query head [B, H, Tq, Tk] (GQA: KV divides H); fp32 scores. A query that
  may see no key returns 0."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  qf = q.astype(jnp.float32).reshape(b, t, kv, h // kv, d)
  s = jnp.einsum('btkgd,bskd->bkgts', qf, k.astype(jnp.float32)) * scale
  m = mask[:, None, None] if mask.ndim == 3 else mask.reshape(mask.shape[0], kv, h // kv, t, -1)
  s = jnp.where(m, s, _MASKED)
  p = jnp.exp(s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))) * m
  p = p / jnp.maximum(jnp.sum(p, axis=-1, keepdims=True), 1e-30)
  o = jnp.einsum('bkgts,bskd->btkgd', p, v.astype(jnp.float32))
  return o.reshape(b, t, h, d).astype(q.dtype)


def prefixed(q, k, v, prefix_k, prefix_v, segment_ids=None, *, window=0, scale=None, block=512):
  """Causal (optionally windowed, document-masked) attention whose every query also sees `prefix_k/v`
  [B, P, KV, D]: persistent memory tokens or attention sinks, which no window or document boundary hides.

  Queries go in blocks of `block`, each against [prefix ‖ the keys it can reach] under its mask — every earlier key
  without a window, the block's span plus window − 1 before it with one — and recomputed in the backward pass, so
  memory is O(block · (P + T)) per head without a window and O(block · (P + block + window)) with one."""
  b, t, h, d = q.shape
  n_p = prefix_k.shape[1]
  seg = _segments(segment_ids, b, t)
  window = 0 if window >= t else window          # a window as long as the sequence hides nothing
  bq = min(block, t)
  n = -(-t // bq)
  pad = n * bq - t
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  segp = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
  # Keys [left padding ‖ k ‖ right padding]: a block's reachable keys are one static-length slice.
  left = window - 1 if window else 0
  span = bq + left if window else t
  widths = lambda x: ((0, 0), (left, pad if window else 0)) + ((0, 0),) * (x.ndim - 2)
  kp, vp = jnp.pad(k, widths(k)), jnp.pad(v, widths(v))
  seg_k = jnp.pad(seg, widths(seg), constant_values=-2)
  pk, pv = prefix_k.astype(k.dtype), prefix_v.astype(v.dtype)

  @jax.checkpoint
  def one(i):
    qi = jax.lax.dynamic_slice_in_dim(qp, i * bq, bq, axis=1)
    si = jax.lax.dynamic_slice_in_dim(segp, i * bq, bq, axis=1)
    start = i * bq if window else 0
    ki, vi = (jax.lax.dynamic_slice_in_dim(x, start, span, axis=1) for x in (kp, vp))
    ski = jax.lax.dynamic_slice_in_dim(seg_k, start, span, axis=1)
    k_idx = start - left + jnp.arange(span)
    inner = _allowed(i * bq + jnp.arange(bq), k_idx, si, ski, window)
    mask = jnp.concatenate([jnp.ones((b, bq, n_p), bool), inner], axis=-1)
    return masked(qi, jnp.concatenate([pk, ki], 1), jnp.concatenate([pv, vi], 1), mask, scale=scale)

  o = jax.lax.map(one, jnp.arange(n))                                  # [n, B, bq, H, D]
  return jnp.moveaxis(o, 0, 1).reshape(b, n * bq, h, d)[:, :t]


# ----------------------------------------------------------------------------------------------------------------
# Chunked: online softmax, custom_vjp.

def _blocks(x, n, c):
  """[B, T, KV, (G,) D] -> [n, B, KV, (G,) c, D]."""
  b = x.shape[0]
  x = x.reshape((b, n, c) + x.shape[2:])
  return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, -2)


def _unblock(x):
  """[n, B, KV, G, c, ...] -> [B, n*c, KV*G, ...]."""
  x = jnp.moveaxis(x, 4, 2)                                   # n, B, c, KV, G, ...
  x = jnp.moveaxis(x, 0, 1)                                   # B, n, c, KV, G, ...
  b, n, c, kv, g = x.shape[:5]
  return x.reshape((b, n * c, kv * g) + x.shape[5:])


def _key_range(i, n, c, window):
  """Key chunks [lo, i] that query chunk i can see."""
  lo = 0 if not window else jnp.maximum(0, (i * c - window + 1) // c)
  return lo, i + 1


def _query_range(j, n, c, window):
  """Query chunks [j, hi) that can see key chunk j."""
  hi = n if not window else jnp.minimum(n, ((j + 1) * c - 1 + window - 1) // c + 1)
  return j, hi


def _scores(qi, kj, segq, segk, i, j, c, window, scale):
  """Scaled scores [B, KV, G, c, c] and the mask for query chunk i against key chunk j."""
  s = jnp.einsum('bkgqd,bkzd->bkgqz', qi, kj, preferred_element_type=jnp.float32) * scale
  idx = jnp.arange(c)
  mask = _allowed(i * c + idx, j * c + idx, segq, segk, window)[:, None, None]
  return s, mask


def _forward(q, k, v, seg, window, scale, c):
  b, t, h, d = q.shape
  kv = k.shape[2]
  n = t // c
  qb = _blocks(q.reshape(b, t, kv, h // kv, d), n, c)          # n, B, KV, G, c, D
  kb, vb = _blocks(k, n, c), _blocks(v, n, c)                  # n, B, KV, c, D
  segb = seg.reshape(b, n, c).transpose(1, 0, 2)               # n, B, c

  def query_chunk(i):
    qi = qb[i]

    def body(j, carry):
      m, l, acc = carry
      s, mask = _scores(qi, kb[j], segb[i], segb[j], i, j, c, window, scale)
      m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, _MASKED), axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + jnp.sum(p, axis=-1)
      pv = jnp.einsum('bkgqz,bkzd->bkgqd', p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
      return m_new, l, acc * corr[..., None] + pv

    shape = qi.shape[:-1]
    init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros(qi.shape, jnp.float32))
    lo, hi = _key_range(i, n, c, window)
    m, l, acc = jax.lax.fori_loop(lo, hi, body, init)
    return acc / l[..., None], m + jnp.log(l)

  o, lse = jax.lax.map(query_chunk, jnp.arange(n))             # n, B, KV, G, c, (D)
  return _unblock(o).astype(q.dtype), lse


def _backward(q, k, v, seg, o, lse, do, window, scale, c):
  b, t, h, d = q.shape
  kv = k.shape[2]
  g, n = h // kv, t // c
  qb = _blocks(q.reshape(b, t, kv, g, d), n, c)
  dob = _blocks(do.reshape(b, t, kv, g, d), n, c)
  kb, vb = _blocks(k, n, c), _blocks(v, n, c)
  segb = seg.reshape(b, n, c).transpose(1, 0, 2)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)        # B, T, H
  deltab = _blocks(delta.reshape(b, t, kv, g, 1), n, c)[..., 0]                  # n, B, KV, G, c

  def probs(i, j):
    s, mask = _scores(qb[i], kb[j], segb[i], segb[j], i, j, c, window, scale)
    p = jnp.where(mask, jnp.exp(s - lse[i][..., None]), 0.0)
    dp = jnp.einsum('bkgqd,bkzd->bkgqz', dob[i], vb[j], preferred_element_type=jnp.float32)
    return p, p * (dp - deltab[i][..., None])

  def dq_chunk(i):
    def body(j, dq):
      _, ds = probs(i, j)
      return dq + jnp.einsum('bkgqz,bkzd->bkgqd', ds.astype(k.dtype), kb[j], preferred_element_type=jnp.float32)
    lo, hi = _key_range(i, n, c, window)
    return jax.lax.fori_loop(lo, hi, body, jnp.zeros(qb.shape[1:], jnp.float32)) * scale

  def dkv_chunk(j):
    def body(i, carry):
      dk, dv = carry
      p, ds = probs(i, j)
      dv = dv + jnp.einsum('bkgqz,bkgqd->bkzd', p.astype(do.dtype), dob[i], preferred_element_type=jnp.float32)
      dk = dk + jnp.einsum('bkgqz,bkgqd->bkzd', ds.astype(q.dtype), qb[i], preferred_element_type=jnp.float32)
      return dk, dv
    lo, hi = _query_range(j, n, c, window)
    zeros = jnp.zeros(kb.shape[1:], jnp.float32)
    dk, dv = jax.lax.fori_loop(lo, hi, body, (zeros, zeros))
    return dk * scale, dv

  dq = _unblock(jax.lax.map(dq_chunk, jnp.arange(n)))
  dk, dv = jax.lax.map(dkv_chunk, jnp.arange(n))                # n, B, KV, c, D
  dk, dv = (_unblock(x[:, :, :, None]) for x in (dk, dv))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _chunked(q, k, v, seg, window, scale, chunk):
  return _forward(q, k, v, seg, window, scale, chunk)[0]


def _chunked_fwd(q, k, v, seg, window, scale, chunk):
  o, lse = _forward(q, k, v, seg, window, scale, chunk)
  return o, (q, k, v, seg, o, lse)


def _chunked_bwd(window, scale, chunk, res, do):
  q, k, v, seg, o, lse = res
  dq, dk, dv = _backward(q, k, v, seg, o, lse, do, window, scale, chunk)
  return dq, dk, dv, None


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def chunked(q, k, v, segment_ids=None, *, window=0, scale=None, chunk_size=512):
  """Memory-efficient attention; lengths that are not a multiple of the chunk are padded at the end."""
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  c = min(chunk_size, t)
  pad = -t % c
  seg = _segments(segment_ids, b, t)
  if pad:
    # Padded keys sit after every real query, so causality already hides them.
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    seg = jnp.pad(seg, ((0, 0), (0, pad)), constant_values=-1)
  return _chunked(q, k, v, seg, int(window), float(scale), c)[:, :t]


# ----------------------------------------------------------------------------------------------------------------
# Blocks at explicit positions: the pieces of context-parallel attention.

def _position_chunks(x, c, fill):
  """[B, T, ...] -> [n, B, c, ...], the end padded with `fill` up to a multiple of c."""
  pad = -x.shape[1] % c
  if pad:
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=fill)
  b, t = x.shape[:2]
  return jnp.moveaxis(x.reshape((b, t // c, c) + x.shape[2:]), 1, 0)


def _block_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, c):
  """Chunked operands: q [nq, B, KV, G, c, D], k/v [nk, B, KV, c, D], positions/segments [n, B, c]; padded
  queries and keys sit in segment -1 / -2, which nothing matches."""
  b, tq, h, d = q.shape
  kv = k.shape[2]
  qb = jnp.moveaxis(_position_chunks(q.reshape(b, tq, kv, h // kv, d), c, 0), 2, 4)  # n, B, KV, G, c, D
  kb, vb = (jnp.moveaxis(_position_chunks(x, c, 0), 2, 3) for x in (k, v))          # n, B, KV, c, D
  return (qb, kb, vb, _position_chunks(q_pos, c, 0), _position_chunks(k_pos, c, 0),
          _position_chunks(q_seg, c, -1), _position_chunks(k_seg, c, -2))


def block_visible(qp, kp, window=0):
  """Whether some query (positions qp [B, Tq]) may see some key (positions kp [B, Tk]), ignoring documents."""
  ok = jnp.min(kp, axis=-1) <= jnp.max(qp, axis=-1)
  if window:
    ok = ok & (jnp.max(kp, axis=-1) > jnp.min(qp, axis=-1) - window)
  return jnp.any(ok)


def _loop(n, body, init):
  """fori_loop(0, n, body, init); the body inline when n is 1 (short blocks compile without control flow)."""
  return body(0, init) if n == 1 else jax.lax.fori_loop(0, n, body, init)


def _map(f, xs):
  """lax.map; f applied inline when there is one element."""
  if jax.tree.leaves(xs)[0].shape[0] == 1:
    return jax.tree.map(lambda y: y[None], f(jax.tree.map(lambda x: x[0], xs)))
  return jax.lax.map(f, xs)


def _if_visible(single, visible, fn, carry):
  """fn(carry) where the chunk pair is visible; a single pair is taken as visible (its block was checked)."""
  return fn(carry) if single else jax.lax.cond(visible, fn, lambda c: c, carry)


def _block_scores(qi, kj, qp, kp, qs, ks, window, scale):
  s = jnp.einsum('bkgqd,bkzd->bkgqz', qi, kj, preferred_element_type=jnp.float32) * scale
  return s, _allowed(qp, kp, qs, ks, window)[:, None, None]


def block_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, window=0, scale=None, chunk_size=512):
  """Attention of q [B, Tq, H, D] over k, v [B, Tk, KV, D] where key j is seen by query i when k_pos[j] ≤
  q_pos[i], k_seg[j] = q_seg[i] and q_pos[i] − k_pos[j] < window (if set). Online softmax over key chunks, memory
  linear in Tq + Tk; chunk pairs that no query may see are skipped. Returns (o [B, Tq, H, D] fp32 normalised over
  this block, lse [B, H, Tq] fp32, −inf for a query that sees no key here)."""
  b, tq, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  c = min(chunk_size, max(tq, k.shape[1]))
  qb, kb, vb, qpb, kpb, qsb, ksb = _block_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, c)
  single = qb.shape[0] == kb.shape[0] == 1

  def query_chunk(args):
    qi, qp, qs = args

    def body(j, carry):
      def update(carry):
        m, l, acc = carry
        s, ok = _block_scores(qi, kb[j], qp, kpb[j], qs, ksb[j], window, scale)
        m_new = jnp.maximum(m, jnp.max(jnp.where(ok, s, _MASKED), axis=-1))
        p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        pv = jnp.einsum('bkgqz,bkzd->bkgqd', p.astype(v.dtype), vb[j], preferred_element_type=jnp.float32)
        return m_new, l * corr + jnp.sum(p, axis=-1), acc * corr[..., None] + pv
      return _if_visible(single, block_visible(qp, kpb[j], window), update, carry)

    shape = qi.shape[:-1]
    init = (jnp.full(shape, _MASKED, jnp.float32), jnp.zeros(shape, jnp.float32), jnp.zeros(qi.shape, jnp.float32))
    m, l, acc = _loop(kb.shape[0], body, init)
    seen = l > 0
    return acc / jnp.where(seen, l, 1.0)[..., None], jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)

  o, lse = _map(query_chunk, (qb, qpb, qsb))                                    # n, B, KV, G, c, (D)
  o = _unblock(o)[:, :tq]
  lse = jnp.moveaxis(lse, 0, 3)                                                  # B, KV, G, n, c
  return o, lse.reshape(b, h, -1)[..., :tq]


def block_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse, do, *, window=0, scale=None, chunk_size=512):
  """Gradients (dq, dk, dv, fp32) of this block's share of an attention whose output o and log-sum-exp lse
  ([B, H, Tq], finite) were taken over all keys (this block's and others'): probabilities are exp(s − lse), so the
  blocks' shares add up to the whole gradient (FlashAttention-2's backward)."""
  b, tq, h, d = q.shape
  tk, kv = k.shape[1], k.shape[2]
  g = h // kv
  scale = d ** -0.5 if scale is None else scale
  c = min(chunk_size, max(tq, tk))
  qb, kb, vb, qpb, kpb, qsb, ksb = _block_inputs(q, k, v, q_pos, k_pos, q_seg, k_seg, c)
  dob = jnp.moveaxis(_position_chunks(do.reshape(b, tq, kv, g, d), c, 0), 2, 4)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1).reshape(b, tq, kv, g)
  deltab = jnp.moveaxis(_position_chunks(delta, c, 0), 2, 4)                     # n, B, KV, G, c
  lseb = jnp.moveaxis(_position_chunks(jnp.moveaxis(lse.reshape(b, kv, g, tq), 3, 1), c, 0), 2, 4)
  single = qb.shape[0] == kb.shape[0] == 1

  def probs(i, j):
    s, ok = _block_scores(qb[i], kb[j], qpb[i], kpb[j], qsb[i], ksb[j], window, scale)
    p = jnp.where(ok, jnp.exp(s - lseb[i][..., None]), 0.0)
    dp = jnp.einsum('bkgqd,bkzd->bkgqz', dob[i], vb[j], preferred_element_type=jnp.float32)
    return p, p * (dp - deltab[i][..., None])

  def dq_chunk(i):
    def body(j, dq):
      def add(dq):
        _, ds = probs(i, j)
        return dq + jnp.einsum('bkgqz,bkzd->bkgqd', ds.astype(k.dtype), kb[j], preferred_element_type=jnp.float32)
      return _if_visible(single, block_visible(qpb[i], kpb[j], window), add, dq)
    return _loop(kb.shape[0], body, jnp.zeros(qb.shape[1:], jnp.float32)) * scale

  def dkv_chunk(j):
    def body(i, carry):
      def add(carry):
        dk, dv = carry
        p, ds = probs(i, j)
        dv = dv + jnp.einsum('bkgqz,bkgqd->bkzd', p.astype(do.dtype), dob[i], preferred_element_type=jnp.float32)
        dk = dk + jnp.einsum('bkgqz,bkgqd->bkzd', ds.astype(q.dtype), qb[i], preferred_element_type=jnp.float32)
        return dk, dv
      return _if_visible(single, block_visible(qpb[i], kpb[j], window), add, carry)
    zeros = jnp.zeros(kb.shape[1:], jnp.float32)
    dk, dv = _loop(qb.shape[0], body, (zeros, zeros))
    return dk * scale, dv

  dq = _unblock(_map(dq_chunk, jnp.arange(qb.shape[0])))[:, :tq]
  dk, dv = _map(dkv_chunk, jnp.arange(kb.shape[0]))                               # n, B, KV, c, D
  dk, dv = (_unblock(x[:, :, :, None])[:, :tk] for x in (dk, dv))
  return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------------
# Dispatch.

def cudnn_applies(platform: str, dtype, head_dim: int) -> bool:
  """Whether cuDNN flash attention takes these inputs: GPU, 16-bit, head_dim ≤ 128 and a multiple of 8."""
  return (platform == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
          and head_dim <= 128 and head_dim % 8 == 0)


def choose_impl(requested: str, *, platform: str, dtype, head_dim: int, seq_len: int, has_segments: bool) -> str:
  """The attention path for these inputs; `requested` other than 'auto' is honoured or refused with a reason."""
  del has_segments  # every path takes segment ids
  cudnn_ok = cudnn_applies(platform, dtype, head_dim)
  if requested == 'cudnn' and not cudnn_ok:
    raise ValueError('model.attention.impl = cudnn needs a GPU, bf16/fp16 inputs, head_dim <= 128 and a multiple '
                     f'of 8; got platform={platform}, dtype={jnp.dtype(dtype).name}, head_dim={head_dim}')
  if requested != 'auto':
    return requested
  if cudnn_ok:
    return 'cudnn'
  return 'xla' if seq_len <= XLA_MAX_LEN else 'chunked'


def attention(q, k, v, segment_ids=None, *, window=0, impl='auto', chunk_size=512, scale=None, max_segments=64):
  """Causal attention by the path `choose_impl` picks; see the module docstring."""
  platform = jax.default_backend()
  choice = choose_impl(impl, platform=platform, dtype=q.dtype, head_dim=q.shape[-1], seq_len=q.shape[1],
                       has_segments=segment_ids is not None)
  key = (choice, platform, q.shape[1:], jnp.dtype(q.dtype).name, segment_ids is not None, window)
  if key not in _chosen:
    _chosen[key] = choice
    logging.info('attention path %s (requested %s; platform %s, q %s %s, segments %s, window %s)',
                 choice, impl, platform, q.shape, jnp.dtype(q.dtype).name, segment_ids is not None, window)
  if choice == 'naive':
    return naive(q, k, v, segment_ids, window=window, scale=scale)
  if choice == 'chunked':
    return chunked(q, k, v, segment_ids, window=window, scale=scale, chunk_size=chunk_size)
  if choice == 'cudnn' and segment_ids is not None:
    return cudnn_packed(q, k, v, segment_ids, window=window, scale=scale, max_segments=max_segments,
                        chunk_size=chunk_size)
  return library(q, k, v, segment_ids, window=window, scale=scale, implementation=choice)


def chosen_paths() -> list[str]:
  """Every attention path this process has dispatched to, for benchmark reports."""
  return sorted(set(_chosen.values()))

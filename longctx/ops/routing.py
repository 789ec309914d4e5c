"""Routing Transformer attention (Roy, Saffar, Vaswani, Grangier 2021, "Efficient Content-Based Sparse Attention
with Routing Transformers"), as plain jax.

Per head, K centroids μ_k. Queries double as keys (shared Q/K, as in the paper's causal LMs) and are
layer-normalised without scale or bias before routing: u = LN(q). Routing scores s_kt = ⟨u_t, μ_k⟩.

* `balanced`: each cluster takes its top-w tokens by score (K·w = T in the paper's configs), sorted by position;
  causal attention inside each w × w block (a token sees itself and the earlier members of its block); the block
  outputs are scattered back and averaged where a token landed in several clusters; a token in no cluster gets 0
  (the layer's local heads still cover it). Memory O(K·w²) = O(T·w), never O(T²). Which tokens a cluster takes
  depends on every token's score, later ones included: the selection carries no gradient, so no position receives
  gradient from a later one, but a later token can change an earlier token's block.
* `nearest`: the membership that decoding can reproduce (prefix only). A token belongs to the cluster of its nearest
  centroid, decided by itself alone, and attends to the latest `window` members of that cluster up to itself. Tokens
  are sorted by (cluster, position) per head, attention runs over blocks of the sorted order, and the outputs are
  scattered back: memory O(T·w). No output depends on a later token, forward or backward.
* `local`: blocked attention over the current and the previous block of `block` tokens, causal.
* Centroids follow an exponential moving average of the vectors assigned to them (`cluster_stats`, summed across
  data-parallel replicas by the caller, then `ema_update`); `commitment_loss` pulls the routed vectors towards their
  (stopped) centroids; `kmeans_init` seeds the centroids from a first batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_MASKED = -1e30


def layer_norm(x, eps: float = 1e-6):
  """(x − mean) / std over the last axis, no scale or bias, fp32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(jnp.var(x, axis=-1, keepdims=True) + eps)


def scores(q, centroids):
  """Routing scores [B, H, K, T] of the layer-normalised queries q [B, T, H, D] against centroids [H, K, D]."""
  return jnp.einsum('bthd,hkd->bhkt', jax.lax.stop_gradient(layer_norm(q)), centroids.astype(jnp.float32))


def balanced(q, k, v, centroids, window: int, *, route=None, segment_ids=None, scale=None):
  """Balanced routing attention (module docstring). q, k, v [B, T, H, D]; centroids [H, K, D]; window w ≤ T;
  `route` [B, T, H, D]: the vectors that are routed (default q; e.g. q before a rotary embedding); with
  `segment_ids` [B, T, H] a token sees only block members of its own document.
  Returns (o [B, T, H, D], membership count [B, T, H])."""
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  _, idx = jax.lax.top_k(scores(q if route is None else route, centroids), window)   # [B, H, K, w]
  idx = jnp.sort(idx, axis=-1)
  gather = lambda x: jnp.take_along_axis(jnp.moveaxis(x, 2, 1)[:, :, None], idx[..., None], axis=3)
  qc, kc, vc = gather(q), gather(k), gather(v)                                # [B, H, K, w, D]
  s = jnp.einsum('bhkid,bhkjd->bhkij', qc.astype(jnp.float32), kc.astype(jnp.float32)) * scale
  causal = idx[..., None, :] <= idx[..., :, None]
  if segment_ids is not None:
    sc = jnp.take_along_axis(jnp.moveaxis(segment_ids, 2, 1)[:, :, None], idx, axis=3)     # [B, H, K, w]
    causal = causal & (sc[..., None, :] == sc[..., :, None])
  s = jnp.where(causal, s, _MASKED)
  p = jax.nn.softmax(s, axis=-1)
  oc = jnp.einsum('bhkij,bhkjd->bhkid', p, vc.astype(jnp.float32))           # [B, H, K, w, D]
  flat = idx.reshape(b, h, -1)
  bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, :, None]
  total = jnp.zeros((b, h, t, d), jnp.float32).at[bi, hi, flat].add(oc.reshape(b, h, -1, d))
  count = jnp.zeros((b, h, t), jnp.float32).at[bi, hi, flat].add(1.0)
  o = total / jnp.maximum(count, 1.0)[..., None]
  return jnp.moveaxis(o, 1, 2).astype(q.dtype), jnp.moveaxis(count, 1, 2)


def _two_blocks(q, k, v, block: int, scale, ids=None, span: int = 0):
  """Causal attention of each block of `block` tokens over itself and the block before. q, k, v [B, T, H, D]; with
  `ids` [B, T, H] a key counts only where its id equals the query's, with `span` only if fewer than `span` positions
  back. fp32 scores; a query with no key (never: it sees itself) would return 0."""
  b, t, h, d = q.shape
  n = -(-t // block)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, n * block - t)) + ((0, 0),) * (x.ndim - 2))
  blocks = lambda x: pad(x).reshape((b, n, block) + x.shape[2:])
  prev = lambda x: jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
  pair = lambda x: jnp.concatenate([prev(blocks(x)), blocks(x)], 2)                      # [B, N, 2·block, ...]
  keys, values = pair(k), pair(v)
  s = jnp.einsum('bnihd,bnjhd->bnhij', blocks(q).astype(jnp.float32), keys.astype(jnp.float32)) * scale
  qpos = jnp.arange(n)[:, None] * block + jnp.arange(block)[None]                          # [N, block]
  kpos = jnp.concatenate([qpos - block, qpos], axis=1)                                     # [N, 2·block]
  ok = (kpos[:, None, :] <= qpos[:, :, None]) & (kpos[:, None, :] >= 0)
  if span:
    ok = ok & (qpos[:, :, None] - kpos[:, None, :] < span)
  ok = ok[None, :, None]                                                                   # [1, N, 1, block, 2·block]
  if ids is not None:
    qi, ki = jnp.moveaxis(blocks(ids), 3, 2), jnp.moveaxis(pair(ids), 3, 2)                # [B, N, H, ·]
    ok = ok & (qi[..., :, None] == ki[..., None, :])
  p = jax.nn.softmax(jnp.where(ok, s, _MASKED), axis=-1) * ok
  o = jnp.einsum('bnhij,bnjhd->bnihd', p, values.astype(jnp.float32))
  return o.reshape(b, n * block, h, d)[:, :t]


def local(q, k, v, block: int, *, segment_ids=None, scale=None):
  """Causal attention over the current and the previous block of `block` tokens. q, k, v [B, T, H, D] (KV heads
  equal to H); any T (the last block is padded); `segment_ids` [B, T, H]: keys of the query's document only."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  return _two_blocks(q, k, v, block, scale, ids=segment_ids).astype(q.dtype)


def nearest(q, k, v, centroids, window: int, *, route=None, segment_ids=None, scale=None):
  """Routing attention with prefix-only membership (module docstring). q, k, v [B, T, H, D]; centroids [H, K, D];
  `route` and `segment_ids` as in `balanced`. Returns (o [B, T, H, D], cluster index [B, T, H])."""
  b, t, h, d = q.shape
  scale = d ** -0.5 if scale is None else scale
  cluster = assign(q if route is None else route, centroids)                              # [B, T, H]
  group = cluster if segment_ids is None else segment_ids * centroids.shape[1] + cluster
  order = jnp.argsort(group, axis=1, stable=True)                                         # by (group, position)
  sort = lambda x: jnp.take_along_axis(x, order.reshape(order.shape + (1,) * (x.ndim - 3)), axis=1)
  o = _two_blocks(sort(q), sort(k), sort(v), window, scale, ids=sort(group), span=window)
  bi, hi = jnp.arange(b)[:, None, None], jnp.arange(h)[None, None, :]
  out = jnp.zeros_like(o).at[bi, order, hi].set(o)
  return out.astype(q.dtype), cluster


def assign(route, centroids):
  """Index [B, T, H] of each token's nearest centroid: the cluster a token joins by itself."""
  return _nearest(layer_norm(jax.lax.stop_gradient(route)), centroids)


def nearest_mask(cluster_q, cluster_k, q_pos, window: int):
  """Which cached keys a query sees under `nearest` membership, for decoding: [B, H, Tq, Tk] from the queries'
  clusters [B, Tq, H] at positions q_pos [Tq] and every cached key's cluster [B, Tk, H] (keys past the newest query
  are masked by position): same cluster, not later, and among the latest `window` members up to the query."""
  k_pos = jnp.arange(cluster_k.shape[1])
  same = jnp.moveaxis(cluster_q, 1, 2)[..., :, None] == jnp.moveaxis(cluster_k, 1, 2)[..., None, :]
  seen = same & (k_pos[None, :] <= q_pos[:, None])
  # Members of the query's cluster from key j up to the query: fewer than `window` before j's successor.
  members_after = jnp.cumsum(seen[..., ::-1].astype(jnp.int32), axis=-1)[..., ::-1]
  return seen & (members_after <= window)


def local_mask(q_pos, num_keys: int, block: int):
  """[Tq, Tk]: keys in the query's block or the block before, not later than the query (decoding `local`)."""
  k_pos = jnp.arange(num_keys)
  start = (q_pos // block - 1) * block
  return (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] >= start[:, None])


def _nearest(u, centroids):
  """Index [B, T, H] of each vector's nearest centroid (largest score)."""
  return jnp.argmax(jnp.einsum('bthd,hkd->bthk', u, centroids.astype(jnp.float32)), axis=-1)


def cluster_stats(q, centroids):
  """Sums [H, K, D] and counts [H, K] of the layer-normalised queries assigned to each nearest centroid (argmax
  score), over batch and time: what the EMA needs, to be summed across data-parallel replicas."""
  u = layer_norm(jax.lax.stop_gradient(q))                                    # [B, T, H, D]
  onehot = jax.nn.one_hot(_nearest(u, centroids), centroids.shape[1], dtype=jnp.float32)    # [B, T, H, K]
  return jnp.einsum('bthk,bthd->hkd', onehot, u), jnp.sum(onehot, axis=(0, 1))


def ema_update(centroids, sums, counts, decay: float = 0.999, eps: float = 1e-5):
  """μ ← decay · μ + (1 − decay) · sums / (counts + eps) for clusters that were assigned anything; others keep μ."""
  mean = sums / (counts[..., None] + eps)
  new = decay * centroids + (1.0 - decay) * mean
  return jnp.where(counts[..., None] > 0, new, centroids)


def commitment_loss(q, centroids):
  """mean_t ‖u_t − sg(μ_nearest(t))‖² with u = LN(q): the gradient reaches the queries, never the centroids."""
  u = layer_norm(q)
  mu = jax.lax.stop_gradient(centroids.astype(jnp.float32))
  nearest = _nearest(jax.lax.stop_gradient(u), mu)
  chosen = jnp.take_along_axis(mu[None, None], nearest[..., None, None], axis=3)[..., 0, :]   # [B, T, H, D]
  return jnp.mean(jnp.sum(jnp.square(u - chosen), axis=-1))


def kmeans_init(q, num_clusters: int, iterations: int, key):
  """Centroids [H, K, D] from a batch q [B, T, H, D]: K random layer-normalised vectors per head, then Lloyd steps
  (a cluster left empty keeps its previous centroid)."""
  b, t, h, d = q.shape
  u = layer_norm(q).reshape(b * t, h, d)
  pick = jax.random.choice(key, b * t, (num_clusters,), replace=False)
  centroids = jnp.moveaxis(u[pick], 0, 1)                                      # [H, K, D]
  for _ in range(iterations):
    sums, counts = cluster_stats(q, centroids)
    centroids = jnp.where(counts[..., None] > 0, sums / jnp.maximum(counts, 1.0)[..., None], centroids)
  return centroids

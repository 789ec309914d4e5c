"""Routing Transformer attention over a sequence sharded on a mesh axis in natural order (`longctx.ops.routing` is
the single-device form; each function here returns what it returns on the whole row).

* `sharded_local`: blocks of `block` tokens attend to themselves and the block before. A shard holds whole blocks,
  so the only keys it lacks are the previous shard's last block: one `ppermute` of that block's K/V (a halo).
* `sharded_balanced`: each cluster takes its top-w tokens by score over the whole sequence, without gathering the
  sequence. Each device ranks its own tokens (top-min(w, shard) per cluster); the candidates' scores and positions,
  scalars, are all-gathered and the global top-w taken from them, so every device knows every cluster's members.
  Device d owns clusters d·K/n … (d+1)·K/n − 1: in n − 1 `ppermute` steps every device sends each owner the
  vectors of that owner's members it holds, the owner attends inside its clusters, and n − 1 more steps send the
  outputs home, where they are averaged over the clusters a token landed in. Vectors in flight and at rest are
  [K/n, w] per head, the size of a shard when K·w = T (the paper's setting); the all-gathered scalars are
  n · min(w, T/n) per cluster. The backward pass is autodiff through the same steps.
* `sharded_nearest`: prefix-only membership. A token sees the members of its own cluster and document whose rank
  in the cluster (how many of its members come earlier in the row) is within w below its own. Ranks need only the
  per-shard cluster counts (all-gathered, [n, K] per row and head); then K/V, clusters and ranks go round the ring
  as in ring attention, each device attending its queries to every block not later than its own with that mask,
  merged by log-sum-exp. Its reach is unbounded in position (a cluster's latest w members can lie on any earlier
  shard), so the cost is that of masked ring attention: compute O(T²/n) per device, memory that of one shard × shard
  block (recomputed in the backward pass), rather than O(T·w).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from longctx.ops import routing as ops
from longctx.parallel.context import empty_partial, map_shards, merge_partials, row_layout
from longctx.parallel.rules import logical_to_spec


def _layout(q, segment_ids, mesh, axis):
  """(segment ids [B, T], the spec of the row [B, T], of [B, T, H, D] with the heads over the tensor axis where
  they divide, and of per-head [H, K, D] centroids)."""
  seg, row = row_layout((q,), segment_ids, mesh, axis)
  heads = logical_to_spec(('act_heads',), q.shape[2:3], mesh)[0]
  return seg, row, P(row[0], axis, heads, None), P(heads, None, None)


def _shift(x, axis: str, n: int, by: int):
  """x from the device `by` places before (cyclically): device r receives device r − by's x."""
  return jax.lax.ppermute(x, axis, [(i, (i + by) % n) for i in range(n)])


def sharded_local(q, k, v, block: int, segment_ids, *, mesh, axis: str = 'sequence', scale=None):
  """`ops.local` over q, k, v [B, T, H, D] whose T is sharded over `axis` in natural order, each shard a whole
  number of blocks; `segment_ids` [B, T] or None."""
  n = mesh.shape[axis]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  seg, row, spec, _ = _layout(q, segment_ids, mesh, axis)

  def body(q, k, v, sg):
    me = jax.lax.axis_index(axis)
    before = lambda x: jax.lax.ppermute(x[:, -block:], axis, [(i, i + 1) for i in range(n - 1)])
    # Device 0 has no block before its first: an id no token has keeps the zeros it receives out of sight.
    halo_ids = jnp.where(me == 0, jnp.min(sg) - 1, before(sg))
    ids = jnp.concatenate([halo_ids, sg], axis=1)
    ids = jnp.broadcast_to(ids[..., None], ids.shape + (q.shape[2],))
    keys, values = (jnp.concatenate([before(x), x], axis=1) for x in (k, v))
    queries = jnp.concatenate([jnp.zeros_like(q[:, :block]), q], axis=1)
    return ops._two_blocks(queries, keys, values, block, scale, ids=ids)[:, block:].astype(q.dtype)

  return map_shards(body, mesh, (spec, spec, spec, row), spec)(q, k, v, seg)


def _members(scores, window: int, axis: str, shard: int):
  """Global positions [B, H, K, w] (ascending) of each cluster's top-w tokens, from this shard's scores
  [B, H, K, shard]; the same on every device."""
  me = jax.lax.axis_index(axis)
  vals, local = jax.lax.top_k(scores, min(window, shard))
  gather = lambda x: jax.lax.all_gather(x, axis, axis=3, tiled=True)
  # Candidates in device order, each device's in its top_k order: ties go to the earlier position, as on one device.
  cand_vals, cand_pos = gather(vals), gather(local + me * shard)
  _, pick = jax.lax.top_k(cand_vals, window)
  return jnp.sort(jnp.take_along_axis(cand_pos, pick, axis=-1), axis=-1)


def sharded_balanced(q, k, v, centroids, window: int, *, route, segment_ids, mesh, axis: str = 'sequence',
                     scale=None):
  """`ops.balanced(q, k, v, centroids, window, route=route, segment_ids=...)[0]` over q, k, v, route [B, T, H, D]
  whose T is sharded over `axis` in natural order; centroids [H, K, D] with K a multiple of the axis size;
  `segment_ids` [B, T] or None."""
  n = mesh.shape[axis]
  t, d = q.shape[1], q.shape[3]
  clusters = centroids.shape[1]
  if clusters % n:
    raise ValueError(f'sharded balanced routing: {clusters} clusters do not divide over {axis}={n} devices')
  per = clusters // n
  shard = t // n
  scale = d ** -0.5 if scale is None else scale
  seg, row, spec, centroid_spec = _layout(q, segment_ids, mesh, axis)

  def body(q, k, v, route, centroids, sg):
    me = jax.lax.axis_index(axis)
    members = _members(ops.scores(route, centroids), window, axis, shard)        # [B, H, K, w] global positions
    owned = lambda owner: jax.lax.dynamic_slice_in_dim(members, owner * per, per, axis=2)   # [B, H, per, w]
    ids = jnp.broadcast_to(sg[..., None], sg.shape + (q.shape[2],))
    rows = [jnp.moveaxis(x, 2, 1) for x in (q, k, v)] + [jnp.moveaxis(ids, 2, 1)[..., None]]   # [B, H, t, ·]

    def pick(owner):
      """What this device holds of `owner`'s members: [B, H, per, w, ·] each, zero where another device holds it."""
      pos = owned(owner) - me * shard
      here = ((pos >= 0) & (pos < shard))[..., None]
      at = jnp.clip(pos, 0, shard - 1).reshape(pos.shape[:2] + (-1, 1))
      take = lambda x: jnp.take_along_axis(x, at, axis=2).reshape(pos.shape + x.shape[-1:])
      return [jnp.where(here, take(x), jnp.zeros((), x.dtype)) for x in rows]

    # Members to their owners: at step j every device sends to the device j places after it.
    gathered = pick(me)
    for j in range(1, n):
      sent = _shift(pick((me + j) % n), axis, n, j)
      gathered = [a + s for a, s in zip(gathered, sent)]
    qc, kc, vc, sc = gathered
    mine = owned(me)
    s = jnp.einsum('bhkid,bhkjd->bhkij', qc.astype(jnp.float32), kc.astype(jnp.float32)) * scale
    sc = sc[..., 0]
    visible = (mine[..., None, :] <= mine[..., :, None]) & (sc[..., None, :] == sc[..., :, None])
    p = jax.nn.softmax(jnp.where(visible, s, ops._MASKED), axis=-1)
    out = jnp.einsum('bhkij,bhkjd->bhkid', p, vc.astype(jnp.float32))              # [B, H, per, w, D]

    # Outputs home: at step j every owner sends to the device j places after it what belongs there.
    bi, hi = jnp.arange(out.shape[0])[:, None, None], jnp.arange(out.shape[1])[None, :, None]
    total = jnp.zeros((out.shape[0], out.shape[1], shard, d), jnp.float32)
    count = jnp.zeros((out.shape[0], out.shape[1], shard), jnp.float32)
    for j in range(n):
      home = (me + j) % n
      pos = mine - home * shard
      here = (pos >= 0) & (pos < shard)
      piece = jnp.where(here[..., None], out, 0.0), here.astype(jnp.float32)
      if j:
        piece = tuple(_shift(x, axis, n, j) for x in piece)
      # Received from the owner j places before this device: its members, at this device's positions.
      owner = (me - j) % n
      pos = owned(owner) - me * shard
      at = jnp.clip(pos, 0, shard - 1).reshape(pos.shape[:2] + (-1,))
      total = total.at[bi, hi, at].add(piece[0].reshape(at.shape + (d,)))
      count = count.at[bi, hi, at].add(piece[1].reshape(at.shape))
    o = total / jnp.maximum(count, 1.0)[..., None]
    return jnp.moveaxis(o, 1, 2).astype(q.dtype)

  f = map_shards(body, mesh, (spec, spec, spec, spec, centroid_spec, row), spec)
  return f(q, k, v, route, centroids, seg)


def _ranked_block(q, k, v, q_meta, k_meta, window: int, scale):
  """Attention of q [B, s, H, D] to one block k, v under the prefix-only rule; meta = (cluster, rank, segment)
  [B, s, H] each. Returns (o fp32 normalised over this block's visible keys, lse [B, H, s]; −inf where none)."""
  (qc, qr, qs), (kc, kr, ks) = ([jnp.moveaxis(x, 1, 2) for x in meta] for meta in (q_meta, k_meta))
  pair = lambda a, b: a[..., :, None] - b[..., None, :]
  behind = pair(qr, kr)
  ok = (pair(qc, kc) == 0) & (pair(qs, ks) == 0) & (behind >= 0) & (behind < window)          # [B, H, s, s]
  s = jnp.einsum('bihd,bjhd->bhij', q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  m = jnp.max(jnp.where(ok, s, -jnp.inf), axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  p = jnp.where(ok, jnp.exp(jnp.where(ok, s - m, 0.0)), 0.0)
  total = jnp.sum(p, axis=-1)
  o = jnp.einsum('bhij,bjhd->bihd', p / jnp.maximum(total, 1e-30)[..., None], v.astype(jnp.float32))
  lse = jnp.where(total > 0, m[..., 0] + jnp.log(jnp.maximum(total, 1e-30)), -jnp.inf)
  return o, lse


def sharded_nearest(q, k, v, centroids, window: int, *, route, segment_ids, mesh, axis: str = 'sequence',
                    scale=None):
  """`ops.nearest(q, k, v, centroids, window, route=route, segment_ids=...)[0]` over q, k, v, route [B, T, H, D]
  whose T is sharded over `axis` in natural order (documents contiguous); centroids [H, K, D]; `segment_ids`
  [B, T] or None."""
  n = mesh.shape[axis]
  clusters = centroids.shape[1]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  seg, row, spec, centroid_spec = _layout(q, segment_ids, mesh, axis)
  block = jax.checkpoint(lambda q, k, v, qm, km: _ranked_block(q, k, v, qm, km, window, scale))

  def body(q, k, v, route, centroids, sg):
    me = jax.lax.axis_index(axis)
    cluster = ops.assign(route, centroids)                                           # [B, s, H]
    onehot = jax.nn.one_hot(cluster, clusters, dtype=jnp.int32)                      # [B, s, H, K]
    counts = jax.lax.all_gather(jnp.sum(onehot, axis=1), axis)                        # [n, B, H, K]
    earlier = jnp.sum(jnp.where((jnp.arange(n) < me)[:, None, None, None], counts, 0), axis=0)
    rank = jnp.sum((jnp.cumsum(onehot, axis=1) - onehot + earlier[:, None]) * onehot, axis=-1)   # [B, s, H]
    meta = (cluster, rank, jnp.broadcast_to(sg[..., None], cluster.shape))
    o, lse = empty_partial(q)
    held = (k, v, meta)
    for step in range(n):
      nxt = _shift(held, axis, n, 1) if step < n - 1 else None
      kb, vb, km = held
      if step == 0:
        part = block(q, kb, vb, meta, km)
      else:   # the block of device me − step: skipped when it wrapped round from a later shard
        part = jax.lax.cond(step <= me, lambda kb=kb, vb=vb, km=km: block(q, kb, vb, meta, km),
                            lambda: empty_partial(q))
      o, lse = merge_partials(o, lse, *part)
      held = nxt
    return o.astype(q.dtype)

  f = map_shards(body, mesh, (spec, spec, spec, spec, centroid_spec, row), spec)
  return f(q, k, v, route, centroids, seg)

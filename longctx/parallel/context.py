"""Context parallelism: causal attention over a sequence sharded on a mesh axis (ring and all-gather).

The sequence dimension of q, k, v is sharded over `axis` in whatever token order the data loader chose (`reorder`:
zigzag, striped or none); masks come from each token's true position and document, carried alongside, so the
result is the same in every order and only the work per device changes.

* `context_attention(method='ring')` (Liu et al., "Ring Attention with Blockwise Transformers"): inside
  `jax.shard_map`, n steps; each step attends the local queries to the K/V block held, while `lax.ppermute` passes
  K/V (kv heads only, GQA stays grouped) to the next device; partial outputs merge in fp32 by their log-sum-exp. A block that no local
  query may see (every key later than every query, or in other documents) is skipped. The backward pass is a
  `custom_vjp` that recomputes each block's probabilities from the *global* output and LSE and passes dK/dV around
  the ring with K/V, so they arrive home after n steps: autodiff through a per-block LSE would be wrong (the LSE
  that `jax.nn.dot_product_attention` returns carries no gradient).
* `context_attention(method='all_gather')`: K/V (and their positions) gathered over the axis, queries stay
  sharded; one softmax per query over every key, differentiated by autodiff (all_gather's transpose is a
  reduce-scatter).

* `sharded_recurrence`: a linear recurrence (the chunked forms of longctx.ops) over a sequence sharded in its
  natural order. Its state map over a shard is affine, S_out = M S_in + S_local: each device finds S_local (zero
  initial state) and M (the same form run on zero values from the identity, or for a vector state on zero inputs
  from ones), the (M, S_local) of all devices are gathered and folded in device order — a scan over n small maps,
  cut where a document starts at a shard boundary — and each device runs its form again from its incoming state.
  Cost: two passes of the chunked form (plus the M pass with Dk-wide values), one all-gather of n states; no
  device waits for another's outputs.

* `handed_recurrence`: a recurrence whose state map is not affine (Titans' memory): device r runs its shard once
  device r − 1 has handed it the state (`ppermute`), so the n shards run one after another. Memory stays per
  shard; time is that of one device doing the whole row (plus n small transfers of the memory state), so the gain
  is memory and the layers around it, not this layer's speed.

`reorder(x, n, order)` / `restore` permute a [B, T, ...] row layout so that each of n contiguous shards holds a
balanced share of the causal work: zigzag gives shard r chunks r and 2n − 1 − r of 2n; striped gives it every n-th
token starting at r.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from longctx.parallel.rules import logical_to_spec

ORDERS = ('zigzag', 'striped', 'none')
_NEG = -1e30


def permutation(t: int, n: int, order: str) -> np.ndarray:
  """perm [T]: position perm[i] of the original row goes to slot i of the reordered row."""
  if order == 'none' or n == 1:
    return np.arange(t)
  if order == 'zigzag':
    if t % (2 * n):
      raise ValueError(f'zigzag needs the length {t} to divide into 2·{n} chunks')
    c = t // (2 * n)
    chunks = np.arange(t).reshape(2 * n, c)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * n - 1 - r]]) for r in range(n)])
  if order == 'striped':
    if t % n:
      raise ValueError(f'striped needs the length {t} to divide by {n}')
    return np.arange(t).reshape(t // n, n).T.reshape(-1)
  raise ValueError(f'order {order!r}: one of {ORDERS}')


def reorder(x, n: int, order: str, axis: int = 1):
  return jnp.take(x, permutation(x.shape[axis], n, order), axis=axis)


def restore(x, n: int, order: str, axis: int = 1):
  return jnp.take(x, np.argsort(permutation(x.shape[axis], n, order)), axis=axis)


def _mask(q_pos, k_pos, q_seg, k_seg, window):
  """[B, 1, 1, Tq, Tk]: key not later than the query, same document, within the window (0: none)."""
  ok = k_pos[:, None, :] <= q_pos[:, :, None]
  if window:
    ok = ok & (q_pos[:, :, None] - k_pos[:, None, :] < window)
  ok = ok & (q_seg[:, :, None] == k_seg[:, None, :])
  return ok[:, None, None]


def _grouped(q, kv_heads):
  b, t, h, d = q.shape
  return q.reshape(b, t, kv_heads, h // kv_heads, d)


def _block_forward(q, k, v, mask, scale):
  """One block: (o [B, Tq, H, D] fp32 normalised within the block, lse [B, H, Tq] fp32, −inf where no key)."""
  kv = k.shape[2]
  s = jnp.einsum('btkgd,bskd->bkgts', _grouped(q, kv).astype(jnp.float32), k.astype(jnp.float32)) * scale
  s = jnp.where(mask, s, _NEG)
  m = jnp.max(s, axis=-1, keepdims=True)
  p = jnp.exp(s - m) * mask
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum('bkgts,bskd->btkgd', p / jnp.maximum(l, 1e-30), v.astype(jnp.float32))
  lse = jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.maximum(l[..., 0], 1e-30)), -jnp.inf)
  b, t = q.shape[:2]
  return o.reshape(b, t, -1, q.shape[-1]), lse.reshape(b, -1, t)


def _merge(o_a, lse_a, o_b, lse_b):
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  w_a = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)
  w_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)
  to_o = lambda w: jnp.moveaxis(w, 1, 2)[..., None]                       # [B, H, T] -> [B, T, H, 1]
  return o_a * to_o(w_a) + o_b * to_o(w_b), lse


def _visible(q_pos, k_pos, q_seg, k_seg, window):
  """Whether any local query may see any key of the block (else the block is skipped)."""
  return jnp.any(_mask(q_pos, k_pos, q_seg, k_seg, window))


def _ring_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, *, axis, n, window, scale):
  perm = [(i, (i + 1) % n) for i in range(n)]
  b, t, h, d = q.shape
  o = jnp.zeros((b, t, h, d), jnp.float32)
  lse = jnp.full((b, h, t), -jnp.inf, jnp.float32)
  blk = (k, v, k_pos, k_seg)
  for step in range(n):
    nxt = jax.lax.ppermute(blk, axis, perm) if step < n - 1 else None     # issued before the compute it overlaps
    kb, vb, pb, sb = blk

    def attend(o, lse, kb=kb, vb=vb, pb=pb, sb=sb):
      ob, lb = _block_forward(q, kb, vb, _mask(q_pos, pb, q_seg, sb, window), scale)
      return _merge(o, lse, ob, lb)

    o, lse = jax.lax.cond(_visible(q_pos, pb, q_seg, sb, window), attend, lambda o, lse: (o, lse), o, lse)
    blk = nxt
  return o, lse


def _ring_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse, do, *, axis, n, window, scale):
  perm = [(i, (i + 1) % n) for i in range(n)]
  kv = k.shape[2]
  qg = _grouped(q, kv).astype(jnp.float32)
  dog = _grouped(do, kv).astype(jnp.float32)
  delta = jnp.sum(do.astype(jnp.float32) * o, axis=-1)                      # [B, T, H]
  b, t, h = delta.shape
  delta = jnp.moveaxis(delta, 1, 2).reshape(b, kv, h // kv, t)              # [B, KV, G, T]
  lse_g = jnp.where(jnp.isfinite(lse), lse, 0.0).reshape(b, kv, h // kv, t)
  dq = jnp.zeros(qg.shape, jnp.float32)
  blk = (k, v, k_pos, k_seg, jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  for step in range(n):
    kb, vb, pb, sb, dkb, dvb = blk

    def grads(dq, dkb, dvb, kb=kb, vb=vb, pb=pb, sb=sb):
      mask = _mask(q_pos, pb, q_seg, sb, window)
      s = jnp.einsum('btkgd,bskd->bkgts', qg, kb.astype(jnp.float32)) * scale
      p = jnp.exp(jnp.where(mask, s, _NEG) - lse_g[..., None]) * mask
      dvb = dvb + jnp.einsum('bkgts,btkgd->bskd', p, dog)
      dp = jnp.einsum('btkgd,bskd->bkgts', dog, vb.astype(jnp.float32))
      ds = p * (dp - delta[..., None]) * scale
      dq = dq + jnp.einsum('bkgts,bskd->btkgd', ds, kb.astype(jnp.float32))
      dkb = dkb + jnp.einsum('bkgts,btkgd->bskd', ds, qg)
      return dq, dkb, dvb

    dq, dkb, dvb = jax.lax.cond(_visible(q_pos, pb, q_seg, sb, window), grads, lambda *a: a, dq, dkb, dvb)
    # K/V and their running gradients travel on together; after n moves every block is back home.
    blk = jax.lax.ppermute((kb, vb, pb, sb, dkb, dvb), axis, perm)
  _, _, _, _, dk, dv = blk
  return dq.reshape(q.shape).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _ring(q, k, v, pos, seg, axis, n, window, scale):
  o, _ = _ring_forward(q, k, v, pos, pos, seg, seg, axis=axis, n=n, window=window, scale=scale)
  return o.astype(q.dtype)


def _ring_fwd(q, k, v, pos, seg, axis, n, window, scale):
  o, lse = _ring_forward(q, k, v, pos, pos, seg, seg, axis=axis, n=n, window=window, scale=scale)
  return o.astype(q.dtype), (q, k, v, pos, seg, o, lse)


def _ring_bwd(axis, n, window, scale, res, do):
  q, k, v, pos, seg, o, lse = res
  dq, dk, dv = _ring_backward(q, k, v, pos, pos, seg, seg, o, lse, do, axis=axis, n=n, window=window, scale=scale)
  return dq, dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def _ring_local(q, k, v, pos, seg, *, axis, n, window, scale):
  return _ring(q, k, v, pos, seg, axis, n, window, scale)


def _gather_local(q, k, v, pos, seg, *, axis, n, window, scale):
  gather = lambda x: jax.lax.all_gather(x, axis, axis=1, tiled=True)
  o, _ = _block_forward(q, gather(k), gather(v), _mask(pos, gather(pos), seg, gather(seg), window), scale)
  return o.astype(q.dtype)


def _shard_map(body, mesh, in_specs, out_specs):
  shard_map = getattr(jax, 'shard_map', None)
  if shard_map is None:
    from jax.experimental.shard_map import shard_map
    return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
  return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _rows(arrays, segment_ids, mesh, axis):
  """(segment ids [B, T] int32, ones without documents; the spec of a [B, T, ...] row sharded over `axis`)."""
  seg = jnp.ones(arrays[0].shape[:2], jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  return seg, P(logical_to_spec(('batch',), arrays[0].shape[:1], mesh)[0], axis)


def sharded_recurrence(form, arrays: tuple, segment_ids, *, mesh, axis: str = 'sequence', vector: bool = False,
                       value_index: int = 2):
  """Runs `form(*arrays, initial_state=S, segment_ids=seg) -> (out, final state)` over arrays [B, T, ...] whose T
  is sharded over `axis` in natural order (module docstring). The state is [B, H, Dk, Dv] (M acts on Dk), or with
  `vector` [B, D] (M elementwise). `arrays[value_index]` is the value input that the M pass zeroes (widened to Dk
  for a matrix state: arrays[1] are the keys). Returns the outputs, sharded like the inputs."""
  n = mesh.shape[axis]
  seg, row = _rows(arrays, segment_ids, mesh, axis)

  def body(*local):
    *xs, sg = local
    ids = None if segment_ids is None else sg
    _, s_local = form(*xs, initial_state=None, segment_ids=ids)
    zero = list(xs)
    if vector:
      zero[value_index] = jnp.zeros_like(xs[value_index])
      _, m = form(*zero, initial_state=jnp.ones_like(s_local), segment_ids=ids)
    else:
      zero[value_index] = jnp.zeros_like(xs[1])
      eye = jnp.broadcast_to(jnp.eye(s_local.shape[-2], dtype=jnp.float32), s_local.shape[:-1] + s_local.shape[-2:-1])
      _, m = form(*zero, initial_state=eye, segment_ids=ids)
    gather = lambda x: jax.lax.all_gather(x, axis)
    ms, ss, first, last = gather(m), gather(s_local), gather(sg[:, 0]), gather(sg[:, -1])
    me = jax.lax.axis_index(axis)
    state = jnp.zeros_like(s_local)
    for j in range(n - 1):
      if vector:
        moved = ms[j] * state + ss[j]
      else:
        moved = jnp.einsum('bhij,bhjv->bhiv', ms[j], state) + ss[j]
      # Shard j+1 continues shard j's last document, or starts afresh.
      keep = (first[j + 1] == last[j]).reshape(state.shape[:1] + (1,) * (state.ndim - 1))
      state = jnp.where(j < me, jnp.where(keep, moved, 0.0), state)
    out, _ = form(*xs, initial_state=state, segment_ids=ids)
    return out

  return _shard_map(body, mesh, (row,) * (len(arrays) + 1), row)(*arrays, seg)


def handed_recurrence(form, arrays: tuple, fresh_state, segment_ids, *, mesh, axis: str = 'sequence'):
  """Runs `form(*arrays, state, fresh_state, segment_ids) -> (out, final state)` over arrays [B, T, ...] sharded
  over `axis` in natural order, handing the state from device to device (module docstring). `fresh_state` (a
  pytree with leading batch dim, the state at a document start) is where device 0 starts and where a device starts
  whose first token begins a new document; `form` also gets it to restart documents inside the shard. Returns the
  outputs, sharded like the inputs."""
  n = mesh.shape[axis]
  seg, row = _rows(arrays, segment_ids, mesh, axis)
  state_specs = jax.tree.map(lambda _: P(row[0]), fresh_state)

  def body(*local):
    *xs, sg, fresh = local
    ids = None if segment_ids is None else sg
    me = jax.lax.axis_index(axis)
    last_before = jax.lax.ppermute(sg[:, -1], axis, [(i, i + 1) for i in range(n - 1)])
    starts_fresh = (me == 0) | (sg[:, 0] != last_before)
    state = fresh
    out = None
    for j in range(n):
      def run(state):
        begin = jax.tree.map(lambda f, s: jnp.where(starts_fresh.reshape((-1,) + (1,) * (s.ndim - 1)), f, s),
                             fresh, state)
        return form(*xs, begin, fresh, ids)

      shapes = jax.eval_shape(run, state)
      idle = lambda state, shapes=shapes: (jnp.zeros(shapes[0].shape, shapes[0].dtype), state)
      o, final = jax.lax.cond(me == j, run, idle, state)
      out = o if out is None else jnp.where(me == j, o, out)
      if j < n - 1:
        handed = jax.lax.ppermute(final, axis, [(j, j + 1)])
        state = jax.tree.map(lambda h, s: jnp.where(me == j + 1, h, s), handed, state)
    return out

  f = _shard_map(body, mesh, (row,) * (len(arrays) + 1) + (state_specs,), row)
  return f(*arrays, seg, fresh_state)


def _specs(mesh, q, k, axis):
  batch = logical_to_spec(('batch',), q.shape[:1], mesh)[0]
  heads = logical_to_spec(('act_heads',), q.shape[2:3], mesh)[0]
  kv_heads = logical_to_spec(('act_kv_heads',), k.shape[2:3], mesh)[0]
  if (heads is None) != (kv_heads is None):
    heads = kv_heads = None
  return P(batch, axis, heads, None), P(batch, axis, kv_heads, None), P(batch, axis)


def context_attention(q, k, v, positions, segment_ids=None, *, mesh, axis: str = 'sequence', method: str = 'ring',
                      window: int = 0, scale=None):
  """Causal attention of q [B, T, H, D] over k, v [B, T, KV, D] whose T is sharded over `axis` of `mesh` (in any
  token order): key j is seen by query i when positions[j] ≤ positions[i], same segment, within `window`.
  method: ring | all_gather (module docstring)."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  seg = jnp.ones(positions.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  n = mesh.shape[axis]
  local = {'ring': _ring_local, 'all_gather': _gather_local}[method]
  q_spec, kv_spec, row_spec = _specs(mesh, q, k, axis)
  body = functools.partial(local, axis=axis, n=n, window=window, scale=scale)
  f = _shard_map(body, mesh, (q_spec, kv_spec, kv_spec, row_spec, row_spec), q_spec)
  return f(q, k, v, positions.astype(jnp.int32), seg)

"""Context parallelism: causal attention over a sequence sharded on a mesh axis (ring and all-gather).

The sequence dimension of q, k, v is sharded over `axis` in whatever token order the data loader chose (`reorder`:
zigzag, striped or none); masks come from each token's true position and document, carried alongside, so the
result is the same in every order and only the work per device changes.

* `context_attention(method='ring')` (Liu et al., "Ring Attention with Blockwise Transformers"): inside
  `jax.shard_map`, n steps; each step attends the local queries to the K/V block held, while `lax.ppermute` passes
  K/V (kv heads only, GQA stays grouped) to the next device; partial outputs merge in fp32 by their log-sum-exp. The
  backward pass is a `custom_vjp` that recomputes each block's gradient from the *global* output and LSE and passes
  dK/dV round the ring behind K/V, so they arrive home after n steps: autodiff through a per-block LSE would be
  wrong (the LSE that `jax.nn.dot_product_attention` returns carries no gradient).
* `context_attention(method='all_gather')`: K/V (and their positions) gathered over the axis, queries stay
  sharded, one block per device; the backward gathers K/V again and reduce-scatters dK/dV.

Blocks run one of two ways, memory linear in the shard either way:
* cuDNN (`impl` auto or cudnn, where `cudnn_blocks_supported`: rows of one document, no window, zigzag or natural
  order): the order fixes which (query chunk, key chunk) pairs are causal, fully visible or empty, so each ring step
  (or each of the n blocks of the gathered K/V) is one to three cuDNN calls with a plain causal or no mask, and a
  block no local query sees is skipped; the backward hands cuDNN's backward kernel the global output and LSE.
* chunked (everything else: documents, windows, striped order, other backends): online softmax over key chunks at
  explicit positions (`longctx.ops.attention.block_forward` / `block_backward`); chunk pairs that no query may
  see are skipped, and a whole block no local query may see is skipped too.

* `sharded_recurrence`: a linear recurrence (the chunked forms of longctx.ops) over a sequence sharded in its
  natural order. Its state map over a shard is affine, S_out = M S_in + S_local: each device finds S_local (zero
  initial state) and M (the same form run on zero values from the identity, or for a vector state on zero inputs
  from ones), the (M, S_local) of all devices are gathered and folded in device order — a scan over n small maps,
  cut where a document starts at a shard boundary — and each device runs its form again from its incoming state.
  Cost: two passes of the chunked form (plus the M pass with Dk-wide values), one all-gather of n states; no
  device waits for another's outputs.

* `handed_recurrence`: a recurrence whose state map is not affine (Titans' memory): device r runs its shard once
  device r − 1 has handed it the state (`ppermute`). One head group at a time: the heads are independent
  recurrences, so while device r runs group l device r − 1 runs group l + 1 (a wavefront). With L groups the row
  takes n + L − 1 stages of a 1/L-shard's work, (n + L − 1)/L shards' time (1.5 at n = 2, L = 4; 1.9 at n = 8,
  L = 16) where handing whole shards takes n; memory stays per shard, and each stage moves 1/L of the state.

* `balance` (rows in natural order, no window): the rows stay in the order the recurrent layers of a hybrid need,
  and each full-attention call moves its q, k, v, positions and documents to zigzag order across the shards first
  (`to_zigzag`: two `ppermute`s of half a shard each) and its output back (`from_zigzag`), so every device does an
  equal share of the causal work instead of the last device doing 2n − 1 of the n² causal blocks' halves.

`reorder(x, n, order)` / `restore` permute a [B, T, ...] row layout so that each of n contiguous shards holds a
balanced share of the causal work: zigzag gives shard r chunks r and 2n − 1 − r of 2n; striped gives it every n-th
token starting at r.
"""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from longctx.ops import attention as attention_ops
from longctx.parallel.rules import logical_to_spec

ORDERS = ('zigzag', 'striped', 'none')


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


def merge_partials(o_a, lse_a, o_b, lse_b):
  """Two partial attentions over disjoint keys (o fp32 normalised over its keys, lse [B, H, T]) as one."""
  lse = jnp.logaddexp(lse_a, lse_b)
  safe = jnp.where(jnp.isfinite(lse), lse, 0.0)
  w_a = jnp.where(jnp.isfinite(lse_a), jnp.exp(lse_a - safe), 0.0)
  w_b = jnp.where(jnp.isfinite(lse_b), jnp.exp(lse_b - safe), 0.0)
  to_o = lambda w: jnp.moveaxis(w, 1, 2)[..., None]                       # [B, H, T] -> [B, T, H, 1]
  return o_a * to_o(w_a) + o_b * to_o(w_b), lse


def empty_partial(q):
  """The partial attention over no keys: o = 0, lse = −∞."""
  b, t, h, _ = q.shape
  return jnp.zeros(q.shape, jnp.float32), jnp.full((b, h, t), -jnp.inf, jnp.float32)


class _Chunked:
  """Blocks by longctx.ops.attention.block_forward / block_backward: any positions, documents and window."""

  def __init__(self, window, scale, chunk):
    self.kw = dict(window=window, scale=scale, chunk_size=chunk)
    self.window = window

  def forward(self, step, q, k, v, q_pos, k_pos, q_seg, k_seg):
    del step
    return jax.lax.cond(attention_ops.block_visible(q_pos, k_pos, self.window),
                        lambda: attention_ops.block_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, **self.kw),
                        lambda: empty_partial(q))

  def backward(self, step, q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse, do):
    del step
    zeros = lambda: tuple(jnp.zeros(x.shape, jnp.float32) for x in (q, k, v))
    return jax.lax.cond(
        attention_ops.block_visible(q_pos, k_pos, self.window),
        lambda: attention_ops.block_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, o, lse, do, **self.kw), zeros)


  def gathered_forward(self, q, k, v, q_pos, k_pos, q_seg, k_seg):
    return self.forward(0, q, k, v, q_pos, k_pos, q_seg, k_seg)

  def gathered_backward(self, *args):
    return self.backward(0, *args)


class _XlaKernel:
  """Dense blocks in XLA (`block_forward` / `block_backward` in one chunk): the reference for _CudnnKernel, and
  fine for short blocks."""

  def __init__(self, scale):
    self.scale = scale

  def _layout(self, q, k, causal):
    """Positions and documents that give a causal block (query i sees keys ≤ i) or a fully visible one."""
    b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
    k_pos = jnp.broadcast_to(jnp.arange(tk), (b, tk))
    q_pos = jnp.broadcast_to(jnp.arange(tq) if causal else jnp.full((tq,), tk), (b, tq))
    seg = lambda t: jnp.zeros((b, t), jnp.int32)
    return dict(q_pos=q_pos, k_pos=k_pos, q_seg=seg(tq), k_seg=seg(tk), scale=self.scale, chunk_size=max(tq, tk))

  def fwd(self, q, k, v, causal):
    return attention_ops.block_forward(q, k, v, **self._layout(q, k, causal))

  def bwd(self, q, k, v, o, lse, do, causal):
    return attention_ops.block_backward(q, k, v, o=o, lse=lse, do=do, **self._layout(q, k, causal))


class _CudnnKernel:
  """cuDNN flash attention blocks. The backward is handed the global output and log-sum-exp (the public API
  only differentiates through its own), so each block yields its share of the whole gradient."""

  def __init__(self, scale):
    from jax._src.cudnn import fused_attention_stablehlo as cu  # the backward with given residuals is not public
    self.cu, self.scale = cu, scale

  def _mask(self, causal):
    return self.cu.MaskType.CAUSAL if causal else self.cu.MaskType.NO_MASK

  def fwd(self, q, k, v, causal):
    o, lse = self.cu.dot_product_attention(q, k, v, scale=self.scale, qkv_layout='BTNH', return_residual=True,
                                           mask_type=self._mask(causal))
    return o.astype(jnp.float32), lse.astype(jnp.float32)

  def bwd(self, q, k, v, o, lse, do, causal):
    cu = self.cu
    none = jnp.zeros(0, q.dtype)
    grads = cu._dot_product_attention_bwd_p_wrapper.bind(
        q, k, v, none, none, none, none, none, none, none, lse, o.astype(q.dtype), do.astype(q.dtype),
        scale=self.scale, seed=0, dropout_rate=0.0, variadic_args=(False, False), mask_type=self._mask(causal),
        layout=cu._normalize_layout('BTNH').value, sliding_window_length=None)
    return tuple(g.astype(jnp.float32) for g in grads[:3])


class _Structured:
  """Blocks for rows of one document in zigzag or natural order, no window, on a dense kernel (cuDNN or XLA) that
  knows only 'causal' and 'no mask'. The block structure follows from the order: the K/V block of device src is,
  for device me's queries, the diagonal (src = me: causal chunks), earlier (src < me) or later (src > me), and each
  (query chunk, key chunk) pair in it is causal (same chunk), fully visible (key chunk earlier) or skipped. Ring
  step s holds the block of src = me − s; the all-gather path walks all n blocks of the gathered K/V."""

  RELATIONS = ('diagonal', 'earlier', 'later')

  def __init__(self, kernel, order, axis, n):
    self.kernel, self.order, self.axis, self.n = kernel, order, axis, n

  def _relation(self, src):
    """Index into RELATIONS of device src's block for this device's queries."""
    me = jax.lax.axis_index(self.axis)
    return jnp.where(src == me, 0, jnp.where(src < me, 1, 2))

  def _fwd(self, relation, q, k, v):
    fwd = self.kernel.fwd
    if self.order == 'none':
      return {'diagonal': lambda: fwd(q, k, v, True), 'earlier': lambda: fwd(q, k, v, False),
              'later': lambda: empty_partial(q)}[relation]()
    c = q.shape[1] // 2
    qa, qb, ka, kb, va, vb = q[:, :c], q[:, c:], k[:, :c], k[:, c:], v[:, :c], v[:, c:]
    join = lambda a, b: (jnp.concatenate([a[0], b[0]], 1), jnp.concatenate([a[1], b[1]], 2))
    if relation == 'diagonal':
      return join(fwd(qa, ka, va, True), merge_partials(*fwd(qb, ka, va, False), *fwd(qb, kb, vb, True)))
    # An earlier block: every local query sees its first chunk only; a later one: our second chunk sees all of it.
    if relation == 'earlier':
      return fwd(q, ka, va, False)
    return join(empty_partial(qa), fwd(qb, k, v, False))

  def _bwd(self, relation, q, k, v, o, lse, do):
    bwd = self.kernel.bwd
    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    if self.order == 'none':
      if relation == 'later':
        return zeros(q), zeros(k), zeros(v)
      return bwd(q, k, v, o, lse, do, relation == 'diagonal')
    c = q.shape[1] // 2
    a, b = slice(None, c), slice(c, None)
    part = lambda qs, ks, causal: bwd(q[:, qs], k[:, ks], v[:, ks], o[:, qs], lse[..., qs], do[:, qs], causal)
    cat = lambda x, y: jnp.concatenate([x, y], 1)
    if relation == 'diagonal':
      dqa, dka1, dva1 = part(a, a, True)
      dqb1, dka2, dva2 = part(b, a, False)
      dqb2, dkb, dvb = part(b, b, True)
      return cat(dqa, dqb1 + dqb2), cat(dka1 + dka2, dkb), cat(dva1 + dva2, dvb)
    if relation == 'earlier':
      dq, dka, dva = part(slice(None), a, False)
      return dq, cat(dka, zeros(dka)), cat(dva, zeros(dva))
    dqb, dk, dv = part(b, slice(None), False)
    return cat(zeros(dqb), dqb), dk, dv

  def _switch(self, relation, fn, *args):
    """fn(RELATIONS[relation], *args); `relation` a static index (ring step 0: the diagonal) or a traced one."""
    if isinstance(relation, int):
      return fn(self.RELATIONS[relation], *args)
    return jax.lax.switch(relation, [lambda r=r: fn(r, *args) for r in self.RELATIONS])

  def _ring_relation(self, step):
    return 0 if step == 0 else self._relation((jax.lax.axis_index(self.axis) - step) % self.n)

  def forward(self, step, q, k, v, *_):
    return self._switch(self._ring_relation(step), self._fwd, q, k, v)

  def backward(self, step, q, k, v, _qp, _kp, _qs, _ks, o, lse, do):
    return self._switch(self._ring_relation(step), self._bwd, q, k, v, o, lse, do)

  def _blocks(self, x):
    s = x.shape[1] // self.n
    return [x[:, j * s:(j + 1) * s] for j in range(self.n)]

  def gathered_forward(self, q, k, v, *_):
    o, lse = empty_partial(q)
    for j, (kj, vj) in enumerate(zip(self._blocks(k), self._blocks(v))):
      o, lse = merge_partials(o, lse, *self._switch(self._relation(j), self._fwd, q, kj, vj))
    return o, lse

  def gathered_backward(self, q, k, v, _qp, _kp, _qs, _ks, o, lse, do):
    dq = jnp.zeros(q.shape, jnp.float32)
    dks, dvs = [], []
    for j, (kj, vj) in enumerate(zip(self._blocks(k), self._blocks(v))):
      dq_j, dk_j, dv_j = self._switch(self._relation(j), self._bwd, q, kj, vj, o, lse, do)
      dq, dks, dvs = dq + dq_j, dks + [dk_j], dvs + [dv_j]
    return dq, jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1)


def _ring_forward(plan, q, k, v, pos, seg):
  perm = [(i, (i + 1) % plan.n) for i in range(plan.n)]
  o, lse = empty_partial(q)
  held = (k, v, pos, seg)
  for step in range(plan.n):
    nxt = jax.lax.ppermute(held, plan.axis, perm) if step < plan.n - 1 else None   # issued before the compute
    kb, vb, pb, sb = held
    o, lse = merge_partials(o, lse, *plan.blocks.forward(step, q, kb, vb, pos, pb, seg, sb))
    held = nxt
  return o, lse


def _ring_backward(plan, q, k, v, pos, seg, o, lse, do):
  """fp32 (dq, dk, dv) of the ring's blocks, from the global output and LSE."""
  perm = [(i, (i + 1) % plan.n) for i in range(plan.n)]
  dq = jnp.zeros(q.shape, jnp.float32)
  held = (k, v, pos, seg)
  dk, dv = jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32)
  for step in range(plan.n):
    nxt = jax.lax.ppermute(held, plan.axis, perm) if step < plan.n - 1 else None   # overlaps this step's compute
    kb, vb, pb, sb = held
    dq_s, dk_s, dv_s = plan.blocks.backward(step, q, kb, vb, pos, pb, seg, sb, o, lse, do)
    # The held block's gradient follows it round the ring; after n moves it is back home.
    dk, dv = jax.lax.ppermute((dk + dk_s, dv + dv_s), plan.axis, perm)
    dq = dq + dq_s
    held = nxt
  return dq, dk, dv


def _gather(plan, *xs):
  return tuple(jax.lax.all_gather(x, plan.axis, axis=1, tiled=True) for x in xs)


def _gathered_forward(plan, q, k, v, pos, seg):
  kg, vg, pg, sg = _gather(plan, k, v, pos, seg)
  return plan.blocks.gathered_forward(q, kg, vg, pos, pg, seg, sg)


def _gathered_backward(plan, q, k, v, pos, seg, o, lse, do):
  """fp32 (dq, dk, dv), K/V gathered again; all_gather's transpose (each device's keys collect their gradient from
  every device) is a reduce-scatter."""
  kg, vg, pg, sg = _gather(plan, k, v, pos, seg)
  dq, dk, dv = plan.blocks.gathered_backward(q, kg, vg, pos, pg, seg, sg, o, lse, do)
  scatter = lambda x: jax.lax.psum_scatter(x, plan.axis, scatter_dimension=1, tiled=True)
  return dq, scatter(dk), scatter(dv)


# method: (forward -> (o fp32, lse), backward -> fp32 (dq, dk, dv)), each inside shard_map on one device's shard.
_METHODS = {'ring': (_ring_forward, _ring_backward), 'all_gather': (_gathered_forward, _gathered_backward)}


class _Plan(NamedTuple):
  """What a sharded attention call fixes: the method (ring | all_gather), the blocks, the axis and its size, and the
  kernel for the prefix (persistent tokens every query sees; XLA or cuDNN, no mask)."""
  method: str
  blocks: Any
  axis: str
  n: int
  prefix_kernel: Any


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _sharded(plan, q, k, v, pos, seg, prefix):
  return _sharded_fwd(plan, q, k, v, pos, seg, prefix)[0]


def _sharded_fwd(plan, q, k, v, pos, seg, prefix):
  o, lse = _METHODS[plan.method][0](plan, q, k, v, pos, seg)
  if prefix is not None:
    o, lse = merge_partials(o, lse, *plan.prefix_kernel.fwd(q, *prefix, False))
  o = o.astype(q.dtype)
  return o, (q, k, v, pos, seg, prefix, o, lse)


def _sharded_bwd(plan, res, do):
  """Every block's gradient from the global output and LSE (autodiff through a per-block LSE would be wrong). The
  prefix's K/V gradient is this device's queries' share: shard_map sums it over the devices holding that prefix."""
  q, k, v, pos, seg, prefix, o, lse = res
  dq, dk, dv = _METHODS[plan.method][1](plan, q, k, v, pos, seg, o, lse, do)
  dprefix = None
  if prefix is not None:
    dq_p, dpk, dpv = plan.prefix_kernel.bwd(q, *prefix, o, lse, do, False)
    dq, dprefix = dq + dq_p, (dpk.astype(prefix[0].dtype), dpv.astype(prefix[1].dtype))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, dprefix


_sharded.defvjp(_sharded_fwd, _sharded_bwd)


def _zigzag_moves(n: int) -> list[list[tuple[int, int]]]:
  """`ppermute` pairs taking each device's first half-shard of a row in natural order (chunk 2r of 2n on device r),
  then its second (chunk 2r + 1), to the device holding that chunk in zigzag order (chunk g on device g, or on
  2n − 1 − g for g ≥ n)."""
  home = lambda g: g if g < n else 2 * n - 1 - g
  return [[(r, home(2 * r + half)) for r in range(n)] for half in (0, 1)]


def to_zigzag(x, axis: str, n: int):
  """Inside shard_map over `axis` of size n: a local [B, T/n, ...] shard of a row in natural order (device r holds
  chunks 2r and 2r + 1 of 2n) -> the same device's shard of the row in zigzag order (chunks r and 2n − 1 − r), by
  two `ppermute`s of half a shard."""
  c = x.shape[1] // 2
  even_moves, odd_moves = _zigzag_moves(n)
  even = jax.lax.ppermute(x[:, :c], axis, even_moves)
  odd = jax.lax.ppermute(x[:, c:], axis, odd_moves)
  first_even = jax.lax.axis_index(axis) % 2 == 0          # device d's first zigzag chunk, d, is even when d is
  return jnp.concatenate([jnp.where(first_even, even, odd), jnp.where(first_even, odd, even)], axis=1)


def from_zigzag(x, axis: str, n: int):
  """The inverse of `to_zigzag` (the same moves reversed): a local shard in zigzag order -> the shard in natural
  order."""
  c = x.shape[1] // 2
  first, second = x[:, :c], x[:, c:]
  first_even = jax.lax.axis_index(axis) % 2 == 0
  back = lambda moves: [(dst, src) for src, dst in moves]
  even_moves, odd_moves = _zigzag_moves(n)
  even = jax.lax.ppermute(jnp.where(first_even, first, second), axis, back(even_moves))
  odd = jax.lax.ppermute(jnp.where(first_even, second, first), axis, back(odd_moves))
  return jnp.concatenate([even, odd], axis=1)


def _balanced(plan, q, k, v, pos, seg, prefix):
  """`_sharded` on rows in natural order, run in zigzag order (module docstring: `balance`)."""
  there = lambda x: to_zigzag(x, plan.axis, plan.n)
  o = _sharded(plan, there(q), there(k), there(v), there(pos), there(seg), prefix)
  return from_zigzag(o, plan.axis, plan.n)


def map_shards(body, mesh, in_specs, out_specs):
  """`jax.shard_map` (jax.experimental's on older jax) without replication checks."""
  shard_map = getattr(jax, 'shard_map', None)
  if shard_map is None:
    from jax.experimental.shard_map import shard_map
    return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)
  return shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def row_layout(arrays, segment_ids, mesh, axis):
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
  seg, row = row_layout(arrays, segment_ids, mesh, axis)

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

  return map_shards(body, mesh, (row,) * (len(arrays) + 1), row)(*arrays, seg)


def wavefront_lanes(heads: int, shards: int) -> int:
  """How many head groups `handed_recurrence` runs as a wavefront: the largest divisor of `heads` up to 2·shards
  (more groups shorten the fill and drain, each group's work gets smaller)."""
  return max(l for l in range(1, min(heads, 2 * shards) + 1) if heads % l == 0)


def handed_recurrence(form, arrays: tuple, fresh_state, segment_ids, *, mesh, axis: str = 'sequence',
                      lanes: int = 1, shared=None):
  """Runs `form(*arrays, state, fresh_state, segment_ids) -> (out, final state)` over arrays [B, T, H, ...] sharded
  over `axis` in natural order, handing the state from device to device (module docstring). `fresh_state` (a
  pytree of [B, H, ...] leaves, the state at a document start) is where device 0 starts and where a device starts
  whose first token begins a new document; `form` also gets it to restart documents inside the shard.

  With `lanes` = L > 1 the heads are independent recurrences (axis 2 of the arrays, axis 1 of the state) and run as
  a wavefront of L head groups: at stage t device r runs group t − r and hands its final state on, so the n shards
  take n + L − 1 stages of 1/L of a shard's work instead of n stages of a whole shard's. `shared` (a pytree, e.g.
  a module's parameters) reaches every device whole and is passed to `form` as `shared=`. Returns the outputs,
  sharded like the inputs."""
  n = mesh.shape[axis]
  seg, row = row_layout(arrays, segment_ids, mesh, axis)
  state_specs = jax.tree.map(lambda _: P(row[0]), fresh_state)
  heads = arrays[0].shape[2]
  if heads % lanes:
    raise ValueError(f'handed recurrence: {lanes} lanes do not divide {heads} heads')
  width = heads // lanes
  if lanes == 1:     # the whole state and every head at each stage
    lane_of = lambda x, lane, at: x
    put_lane = lambda x, part, lane, at: part.astype(x.dtype)
  else:
    lane_of = lambda x, lane, at: jax.lax.dynamic_slice_in_dim(x, lane * width, width, axis=at)
    put_lane = lambda x, part, lane, at: jax.lax.dynamic_update_slice_in_dim(x, part.astype(x.dtype), lane * width,
                                                                            axis=at)
  extra = {} if shared is None else {'shared': shared}

  def body(*local):
    *xs, sg, fresh, extra = local
    kw = {} if shared is None else {'shared': extra['shared']}
    ids = None if segment_ids is None else sg
    me = jax.lax.axis_index(axis)
    last_before = jax.lax.ppermute(sg[:, -1], axis, [(i, i + 1) for i in range(n - 1)])
    starts_fresh = (me == 0) | (sg[:, 0] != last_before)
    lane_xs = lambda lane: [lane_of(x, lane, 2) for x in xs]

    def run(lane_state, lane):
      lane_fresh = jax.tree.map(lambda f: lane_of(f, lane, 1), fresh)
      begin = jax.tree.map(lambda f, s: jnp.where(starts_fresh.reshape((-1,) + (1,) * (s.ndim - 1)), f, s),
                           lane_fresh, lane_state)
      return form(*lane_xs(lane), begin, lane_fresh, ids, **kw)

    lane0_state = jax.tree.map(lambda s: lane_of(s, 0, 1), fresh)
    o_shape = jax.eval_shape(run, lane0_state, 0)[0]

    def stage(carry, t):
      # One traced copy of `form` whatever n and L: the stages are a loop, the lane a device's stage − its index.
      state, out = carry
      lane = t - me
      active = (lane >= 0) & (lane < lanes)
      lane = jnp.clip(lane, 0, lanes - 1)
      lane_state = jax.tree.map(lambda s: lane_of(s, lane, 1), state)
      idle = lambda lane_state, lane: (jnp.zeros(o_shape.shape, o_shape.dtype), lane_state)
      o, final = jax.lax.cond(active, run, idle, lane_state, lane)
      out = jnp.where(active, put_lane(out, o, lane, 2), out)
      # The next device runs this lane at the next stage, from this device's final state.
      handed = jax.lax.ppermute(final, axis, [(i, i + 1) for i in range(n - 1)])
      sender_lane = t - (me - 1)
      took = (me > 0) & (sender_lane >= 0) & (sender_lane < lanes)
      at = jnp.clip(sender_lane, 0, lanes - 1)
      state = jax.tree.map(lambda s, h: jnp.where(took, put_lane(s, h, at, 1), s), state, handed)
      return (state, out), None

    out = jnp.zeros(o_shape.shape[:2] + (o_shape.shape[2] * lanes,) + o_shape.shape[3:], o_shape.dtype)
    (_, out), _ = jax.lax.scan(stage, (fresh, out), jnp.arange(n + lanes - 1))
    return out

  f = map_shards(body, mesh, (row,) * (len(arrays) + 1) + (state_specs, jax.tree.map(lambda _: P(), extra)), row)
  return f(*arrays, seg, fresh_state, extra)


def _specs(mesh, q, k, axis):
  batch = logical_to_spec(('batch',), q.shape[:1], mesh)[0]
  heads = logical_to_spec(('act_heads',), q.shape[2:3], mesh)[0]
  kv_heads = logical_to_spec(('act_kv_heads',), k.shape[2:3], mesh)[0]
  if (heads is None) != (kv_heads is None):
    heads = kv_heads = None
  return P(batch, axis, heads, None), P(batch, axis, kv_heads, None), P(batch, axis)


def cudnn_blocks_supported(q, segment_ids, window, order) -> bool:
  """Whether ring or all-gather attention can run its blocks on cuDNN: `_structured` blocks, and inputs cuDNN takes
  (`longctx.ops.attention.cudnn_applies`)."""
  return (_structured(segment_ids, window, order)
          and attention_ops.cudnn_applies(jax.default_backend(), q.dtype, q.shape[-1]))


def _structured(segment_ids, window, order) -> bool:
  """Whether the block structure follows from the order alone: rows of one document, no window, zigzag or natural
  order."""
  return segment_ids is None and not window and order in ('zigzag', 'none')


def context_attention(q, k, v, positions, segment_ids=None, *, mesh, axis: str = 'sequence', method: str = 'ring',
                      window: int = 0, scale=None, order: str = 'zigzag', impl: str = 'auto', chunk_size: int = 512,
                      prefix=None, balance: bool = False):
  """Causal attention of q [B, T, H, D] over k, v [B, T, KV, D] whose T is sharded over `axis` of `mesh` in token
  order `order` (the data loader's `reorder`): key j is seen by query i when positions[j] ≤ positions[i], same
  segment, within `window`. method: ring | all_gather (module docstring). impl: cudnn (blocks on cuDNN, where
  `cudnn_blocks_supported`), xla (the same block structure on dense XLA blocks), chunked (online softmax in XLA over
  `chunk_size` chunks, any positions and documents) or auto (cudnn where supported, else chunked). `prefix`: keys
  and values [B, P, KV, D] that every query sees, whatever its window and document (persistent tokens), held whole
  by every device: one more unmasked block, merged by its log-sum-exp. `balance`: with order 'none', no window and
  an even shard length, the call runs in zigzag order across the shards (module docstring); the output keeps the
  natural order."""
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  seg = jnp.ones(positions.shape, jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  n = mesh.shape[axis]
  balance = balance and order == 'none' and not window and n > 1 and (q.shape[1] // n) % 2 == 0
  if balance:
    order = 'zigzag'
  structured = _structured(segment_ids, window, order)
  fast = cudnn_blocks_supported(q, segment_ids, window, order)
  if impl == 'cudnn' and not fast:
    raise ValueError('context attention on cuDNN needs a GPU, 16-bit inputs, head_dim <= 128 and a multiple of 8, '
                     f'rows without segment ids, no window and order zigzag or none; got dtype '
                     f'{jnp.dtype(q.dtype).name}, head_dim {q.shape[-1]}, segments {segment_ids is not None}, '
                     f'window {window}, order {order}')
  if method not in _METHODS:
    raise ValueError(f'context attention method {method!r}: one of {", ".join(_METHODS)}')
  if impl not in ('auto', 'cudnn', 'xla', 'chunked'):
    raise ValueError(f'context attention impl {impl!r}: one of auto, cudnn, xla, chunked')
  if impl == 'xla' and not structured:
    raise ValueError('context attention impl xla (dense blocks) needs rows without segment ids, no window and '
                     f'order zigzag or none; got segments {segment_ids is not None}, window {window}, order {order}')
  # auto: cuDNN blocks where they apply, else the chunked blocks (dense XLA blocks would not fit long shards).
  if impl == 'xla':
    blocks = _Structured(_XlaKernel(scale), order, axis, n)
  elif impl == 'cudnn' or (impl == 'auto' and fast):
    blocks = _Structured(_CudnnKernel(scale), order, axis, n)
  else:
    blocks = _Chunked(window, scale, chunk_size)
  q_spec, kv_spec, row_spec = _specs(mesh, q, k, axis)
  prefix_kernel = blocks.kernel if isinstance(blocks, _Structured) else _XlaKernel(scale)
  if prefix is not None:
    prefix = tuple(x.astype(k.dtype) for x in prefix)
  prefix_spec = None if prefix is None else (P(*kv_spec[:1], None, *kv_spec[2:]),) * 2
  body = functools.partial(_balanced if balance else _sharded, _Plan(method, blocks, axis, n, prefix_kernel))
  f = map_shards(body, mesh, (q_spec, kv_spec, kv_spec, row_spec, row_spec, prefix_spec), q_spec)
  return f(q, k, v, positions.astype(jnp.int32), seg, prefix)

"""Routing Transformer layers (Roy et al. 2021): local heads and content-routed heads in one attention layer.

`routing`: of model.num_heads heads, `model.routing.heads` route by online k-means and the rest are local (blocked
attention over the current and previous `local_block` tokens). Routing heads share Q and K: u = LN(W_q x) without
scale or bias serves as query and key (rotated by RoPE for the scores) and is routed un-rotated against the layer's
centroids. `local`: the same layer with no routing heads (the paper's other layers).

Membership (`model.routing.causal`):
  False  balanced, as in the paper: each of K clusters takes its top-w tokens by score, over the whole sequence
         (`longctx.ops.routing.balanced`), so a later token can change an earlier token's block (not its gradient);
  True   prefix only: a token joins its nearest centroid's cluster by itself and attends to the latest w members of
         that cluster up to itself (`longctx.ops.routing.nearest`).
Decoding always uses the prefix-only membership, the only one a token-by-token generator can reproduce: a model
trained with causal=True decodes exactly as it trains; one trained balanced decodes with the nearest-centroid rule.

Centroids [routing heads, K, head_dim] are `Centroids` variables, outside the optimizer: each forward pass leaves the
sums and counts of the vectors assigned to each centroid, and the commitment sum ‖u − sg(μ)‖², in `RoutingStats`
variables; the train step sums them over the global batch (every data-parallel replica's share), moves the centroids
by an exponential moving average, and adds `commitment` × the commitment loss to the objective. A fresh run seeds
the centroids from its first batch by a few k-means iterations (`LanguageModel.seed_routing`).

Under `parallel.sequence` = n > 1 the row stays in its natural order (parallel.load_balance=none) and each shard
holds whole local blocks: local heads take the block before the shard from the previous device; balanced routing
heads pick each cluster's members over the whole sequence and attend on the device that owns the cluster (K must
divide by n); prefix-only routing heads rank each token in its cluster from all-gathered per-shard counts and attend
round a ring (`longctx.parallel.routing`, which states each path's cost).

Config `model.routing`: heads, num_clusters, window (w; 0: data.seq_len / num_clusters, the paper's K·w = T),
local_block, causal, ema_decay (0.999), ema_eps (1e-5), commitment (1e-4), kmeans_iterations. Query, key and value
heads are model.num_heads (no grouped KV here). Caches: keys and values of every head, each routing head's cluster
per position, and the fill count.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ConfigError
from longctx.layers import registry
from longctx.layers.common import Dense, rope
from longctx.ops import routing as ops
from longctx.ops.attention import masked
from longctx.parallel import routing as sharded
from longctx.parallel.rules import sequence_mesh


class Centroids(nnx.Variable):
  """Routing centroids: moved by the train step's EMA, never by the optimizer; saved with the train state."""


class RoutingStats(nnx.Variable):
  """What the last forward pass measured for the EMA and the commitment loss (recomputed every pass)."""


def per_head(segment_ids, heads: int):
  """Segment ids [B, T] repeated for each of `heads` heads: [B, T, heads] (None stays None)."""
  return None if segment_ids is None else jnp.broadcast_to(segment_ids[..., None], segment_ids.shape + (heads,))


@registry.register('routing')
class Routing(registry.Mixer):
  """Local and routing heads in one layer (module docstring)."""
  context_parallel = True
  natural_order = True      # under sequence sharding blocks and cluster members sit at their row positions

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    m, r = config.model, config.model.routing
    d, h = m.d_model, m.num_heads
    hd = m.head_dim or d // h
    self.routed = self.routing_heads(config)
    self.local_heads = h - self.routed
    self.head_dim = hd
    self.q = Dense((d,), (h, hd), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.k = (Dense((d,), (self.local_heads, hd), ('embed', 'heads', 'head_dim'), rngs=rngs)
              if self.local_heads else None)
    self.v = Dense((d,), (h, hd), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.o = Dense((h, hd), (d,), ('heads', 'head_dim', 'embed'), rngs=rngs, std=0.02 / (2 * m.num_layers) ** 0.5)
    self.rope_theta = m.rope_theta
    self.block = r.local_block
    self.layer_index = layer_index
    self.seeding = None     # (seed, iterations) while LanguageModel.seed_routing runs
    if self.routed:
      self.num_clusters = r.num_clusters
      self.window = self.window_of(config)
      self.causal = bool(r.causal)
      start = ops.layer_norm(jax.random.normal(rngs.params(), (self.routed, r.num_clusters, hd)))
      self.centroids = Centroids(start, logical_axes=(None, None, None))
      self.sums = RoutingStats(jnp.zeros((self.routed, r.num_clusters, hd)))
      self.counts = RoutingStats(jnp.zeros((self.routed, r.num_clusters)))
      self.commitment = RoutingStats(jnp.zeros(()))

  @staticmethod
  def routing_heads(config) -> int:
    return config.model.routing.heads

  @staticmethod
  def window_of(config) -> int:
    r = config.model.routing
    return r.window or config.data.seq_len // r.num_clusters

  @classmethod
  def check_config(cls, config, layer_index):
    m, r = config.model, config.model.routing
    routed = cls.routing_heads(config)
    if not 0 <= routed <= m.num_heads or (cls is Routing and routed < 1):
      raise ConfigError('model.routing.heads', r.heads, f'between 1 and model.num_heads={m.num_heads}')
    if r.local_block < 1:
      raise ConfigError('model.routing.local_block', r.local_block, 'a positive block size')
    if not routed:
      return
    if r.num_clusters < 1:
      raise ConfigError('model.routing.num_clusters', r.num_clusters, 'a positive count')
    window = cls.window_of(config)
    if not 1 <= window <= config.data.seq_len:
      raise ConfigError('model.routing.window', r.window,
                        f'between 1 and data.seq_len={config.data.seq_len} (0: seq_len / num_clusters = '
                        f'{config.data.seq_len // r.num_clusters})')
    if not 0.0 < r.ema_decay < 1.0:
      raise ConfigError('model.routing.ema_decay', r.ema_decay, 'a decay in (0, 1); the paper uses 0.999')
    if r.commitment < 0:
      raise ConfigError('model.routing.commitment', r.commitment, 'a weight >= 0; the paper uses 1e-4')
    if r.kmeans_iterations < 0:
      raise ConfigError('model.routing.kmeans_iterations', r.kmeans_iterations, 'a count >= 0')

  @classmethod
  def check_sequence_sharding(cls, config, shards):
    r = config.model.routing
    registry.check_divides_shard('model.routing.local_block', r.local_block, config, shards)
    if not cls.routing_heads(config):
      return
    if not r.causal and r.num_clusters % shards:
      raise ConfigError('model.routing.num_clusters', r.num_clusters,
                        f'a multiple of parallel.sequence={shards}: each device owns an equal share of the clusters')

  @classmethod
  def flops(cls, config, seq_len):
    """4 · D per (query, key) pair: local heads see their block and the one before (causal); routing heads a causal
    w × w block per cluster (balanced; at most as much with prefix-only membership), plus the routing scores."""
    m, r = config.model, config.model.routing
    hd = m.head_dim or m.d_model // m.num_heads
    routed = cls.routing_heads(config)
    b = min(r.local_block, seq_len)
    local_pairs = seq_len * (b + 1) / 2 + max(seq_len - b, 0) * b
    total = 4.0 * local_pairs * hd * (m.num_heads - routed)
    if routed:
      w = cls.window_of(config)
      total += routed * (4.0 * r.num_clusters * w * (w + 1) / 2 * hd + 2.0 * seq_len * r.num_clusters * hd)
    return total

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
    h = self.local_heads + self.routed
    cache = {'k': jnp.zeros((batch, max_len, h, self.head_dim), dtype),
             'v': jnp.zeros((batch, max_len, h, self.head_dim), dtype), 'end': jnp.zeros((), jnp.int32)}
    if self.routed:
      cache['cluster'] = jnp.zeros((batch, max_len, self.routed), jnp.int32)
    return cache

  def __call__(self, x, *, positions, segment_ids, cache=None):
    q, v = self.q(x), self.v(x)
    hl = self.local_heads
    u = ops.layer_norm(q[:, :, hl:]).astype(q.dtype)             # routing heads: shared, normalised Q/K
    q_rot = rope(jnp.concatenate([q[:, :, :hl], u], axis=2), positions, self.rope_theta)
    k_rot = q_rot[:, :, hl:] if self.k is None else jnp.concatenate(
        [rope(self.k(x), positions, self.rope_theta), q_rot[:, :, hl:]], axis=2)
    if cache is not None:
      return self.decode(q_rot, k_rot, v, u, cache)
    scale = self.head_dim ** -0.5
    mesh = sequence_mesh()
    outs = []
    if hl:
      lq, lk, lv = q_rot[:, :, :hl], k_rot[:, :, :hl], v[:, :, :hl]
      outs.append(ops.local(lq, lk, lv, self.block, segment_ids=per_head(segment_ids, hl), scale=scale)
                  if mesh is None else sharded.sharded_local(lq, lk, lv, self.block, segment_ids, mesh=mesh,
                                                             scale=scale))
    if self.routed:
      outs.append(self.route(q_rot[:, :, hl:], v[:, :, hl:], u, segment_ids, scale, mesh))
    return self.o(jnp.concatenate(outs, axis=2).astype(x.dtype)), None

  def route(self, qk, v, u, segment_ids, scale, mesh=None):
    """Routing heads' outputs; leaves this pass's cluster statistics and commitment sum in `RoutingStats`."""
    centroids = self.centroids[...]
    if self.seeding is not None:
      seed, iterations = self.seeding
      key = jax.random.fold_in(jax.random.PRNGKey(seed), self.layer_index)
      centroids = ops.kmeans_init(u, self.num_clusters, iterations, key)
      self.centroids[...] = centroids
    seg = per_head(segment_ids, self.routed)
    if mesh is not None:
      route = sharded.sharded_nearest if self.causal else sharded.sharded_balanced
      o = route(qk, qk, v, centroids, self.window, route=u, segment_ids=segment_ids, mesh=mesh, scale=scale)
    elif self.causal:
      o, _ = ops.nearest(qk, qk, v, centroids, self.window, route=u, segment_ids=seg, scale=scale)
    else:
      o, _ = ops.balanced(qk, qk, v, centroids, self.window, route=u, segment_ids=seg, scale=scale)
    sums, counts = ops.cluster_stats(u, centroids)
    self.sums[...], self.counts[...] = sums, counts
    self.commitment[...] = ops.commitment_loss(u, centroids) * (u.shape[0] * u.shape[1])
    return o

  def decode(self, q, k, v, u, cache):
    """Queries at cache positions end, end+1, ... (one document): local heads over their blocks, routing heads over
    the latest w earlier members of their nearest centroid's cluster."""
    end, hl = cache['end'], self.local_heads
    put = lambda buf, new: jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0, end) + (0,) * (buf.ndim - 2))
    new = {'k': put(cache['k'], k), 'v': put(cache['v'], v), 'end': end + q.shape[1]}
    b, t, s = q.shape[0], q.shape[1], cache['k'].shape[1]
    q_pos = end + jnp.arange(t)
    masks = []
    if hl:
      masks.append(jnp.broadcast_to(ops.local_mask(q_pos, s, self.block), (b, hl, t, s)))
    if self.routed:
      cluster = ops.assign(u, self.centroids[...]).astype(jnp.int32)
      new['cluster'] = put(cache['cluster'], cluster)
      masks.append(ops.nearest_mask(cluster, new['cluster'], q_pos, self.window))
    o = masked(q, new['k'], new['v'], jnp.concatenate(masks, axis=1), scale=self.head_dim ** -0.5)
    return self.o(o), new


@registry.register('local')
class Local(Routing):
  """Local attention only: every head attends over its block and the one before (the Routing Transformer's
  non-routing layers)."""

  @staticmethod
  def routing_heads(config) -> int:
    return 0


def _routing_layers(buffers, stats):
  """(path, centroids, that layer's stats) for every routing layer of matching pure-dict trees."""
  if isinstance(buffers, dict) and 'centroids' in buffers:
    yield (), buffers['centroids'], stats
    return
  if isinstance(buffers, dict):
    for key, sub in buffers.items():
      for path, c, s in _routing_layers(sub, stats[key]):
        yield (key,) + path, c, s


def update_centroids(buffers, stats, decay: float, eps: float):
  """Buffers with every layer's centroids moved by the EMA of the vectors assigned to them in `stats` (sums and
  counts over the global batch)."""
  def put(tree, path, value):
    if not path:
      return {**tree, 'centroids': value}
    return {**tree, path[0]: put(tree[path[0]], path[1:], value)}

  for path, c, s in list(_routing_layers(buffers, stats)):
    buffers = put(buffers, path, ops.ema_update(c, s['sums'], s['counts'], decay, eps))
  return buffers


def commitment_total(buffers, stats):
  """Σ over routing layers of the commitment sums the forward pass left in `stats`."""
  return sum((s['commitment'] for _, _, s in _routing_layers(buffers, stats)), jnp.zeros((), jnp.float32))

"""Titans' ways of joining the long-term memory with attention (Behrouz, Zhong, Mirrokni 2025, section 4).

MAG, memory as a gate (`titans_mag`): sliding-window attention (`model.attention.swa_window`) over
[persistent tokens ‖ x] beside the memory branch (the `titans` mixer) on the same input; both outputs normalised and
combined as  y = RMSNorm(attn) ⊙ σ(RMSNorm(memory)).

MAC, memory as context (`titans_mac`): the sequence is cut into segments of `model.titans.segment_size` tokens. For a
segment S with tokens x:
    h = M_{S−1}(q),  q = L2(SiLU(W_r x))                      (a read of the memory the previous segment left)
    ỹ = Attn over [persistent ‖ W_h h ‖ x]                     (queries from x; with `model.attention.conv_size`
                                                               the tokens' q, k, v pass its short convolution)
    memory ← M_S: the memory trained on ỹ (the `titans` mixer's chunked update, chunk_size tokens at a time)
    y = RMSNorm(ỹ) ⊙ σ(RMSNorm(M_S*(ỹ)))                        (M_S* read at the chunk semantics, as in LMM)
Attention inside a segment is causal at the token level: token i sees every persistent token, and the memory read
h_j and the token x_j for j ≤ i of its own document (h_j depends on x_j through q_j, so a later read would leak the
future). No segment sees another segment's tokens; the memory carries what came before. Documents restart the
memory: a segment's reads come from the initial memory for tokens whose document started inside the segment.
Decoding keeps the segment in progress (its reads' and tokens' keys and values), the memory its reads come from and
the memory mixer's cache; segments are whole chunks of the memory (segment_size a multiple of chunk_size), so a
segment's end is a chunk's end and cached decoding equals the full forward.

Under `parallel.sequence` > 1 (natural order): MAG's branches shard as their mixers do (attention with the prefix
on every device, the memory handed on head group by head group); MAC keeps whole segments on each device and hands
the carry (memory, the memory's convolution cache and its ids) from device to device with the module's parameters
whole on each (`longctx.parallel.context.handed_recurrence`), so its segments run one after another as on one device.

MAL, memory as a layer, is a pattern rather than a mixer: `titans` layers alternating with `swa` layers that have
persistent tokens (configs/titans.py:variant=mal).

Persistent tokens are the attention layer's (`model.attention.persistent_tokens`, 128 in the paper).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ConfigError
from longctx.layers import registry
from longctx.layers.attention import Attention, SlidingWindowAttention
from longctx.layers.common import Dense, RMSNorm, l2_normalize, rope
from longctx.layers.titans import Titans, titans_dims
from longctx.ops.attention import masked
from longctx.ops.chunking import pad_to_multiple
from longctx.ops.titans import init_state, memory as memory_lib
from longctx.parallel.context import handed_recurrence
from longctx.parallel.rules import sequence_mesh


class _Gate(nnx.Module):
  """y = RMSNorm(a) ⊙ σ(RMSNorm(m)): the paper's normalised, sigmoid-gated combination (⊗)."""

  def __init__(self, d: int, eps: float):
    self.a_norm = RMSNorm(d, eps=eps)
    self.m_norm = RMSNorm(d, eps=eps)

  def __call__(self, a, m):
    return self.a_norm(a) * jax.nn.sigmoid(self.m_norm(m).astype(jnp.float32)).astype(a.dtype)


@registry.register('titans_mag')
class TitansMAG(registry.Mixer):
  """Memory as a gate (module docstring)."""
  context_parallel = True   # both branches have their own: attention with the prefix, the memory handed on
  natural_order = True

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    self.attn = SlidingWindowAttention(config, layer_index=layer_index, rngs=rngs)
    self.memory = Titans(config, layer_index=layer_index, rngs=rngs)
    self.gate = _Gate(config.model.d_model, config.model.norm_eps)

  @classmethod
  def check_config(cls, config, layer_index):
    SlidingWindowAttention.check_config(config, layer_index)
    Titans.check_config(config, layer_index)

  @classmethod
  def check_sequence_sharding(cls, config, shards):
    Titans.check_sequence_sharding(config, shards)

  @classmethod
  def flops(cls, config, seq_len):
    return SlidingWindowAttention.flops(config, seq_len) + Titans.flops(config, seq_len)

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
    return {'attn': self.attn.init_cache(batch, max_len, dtype), 'memory': self.memory.init_cache(batch, max_len, dtype)}

  def __call__(self, x, *, positions, segment_ids, cache=None):
    a, attn_cache = self.attn(x, positions=positions, segment_ids=segment_ids,
                              cache=None if cache is None else cache['attn'])
    m, memory_cache = self.memory(x, positions=positions, segment_ids=segment_ids,
                                  cache=None if cache is None else cache['memory'])
    y = self.gate(a, m)
    return y, (None if cache is None else {'attn': attn_cache, 'memory': memory_cache})


@registry.register('titans_mac')
class TitansMAC(registry.Mixer):
  """Memory as context (module docstring)."""
  context_parallel = True   # whole segments on each device, the memory handed from device to device
  natural_order = True

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    m = config.model
    self.attn = Attention(config, layer_index=layer_index, rngs=rngs)
    self.memory = Titans(config, layer_index=layer_index, rngs=rngs)
    h, d = titans_dims(config)
    self.read_q = Dense((m.d_model,), (h, d), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.read_out = Dense((h, d), (m.d_model,), ('heads', 'head_dim', 'embed'), rngs=rngs)
    self.gate = _Gate(m.d_model, m.norm_eps)
    self.segment = m.titans.segment_size

  @classmethod
  def check_config(cls, config, layer_index):
    Attention.check_config(config, layer_index)
    Titans.check_config(config, layer_index)
    t = config.model.titans
    if t.segment_size < 1 or t.segment_size % t.chunk_size:
      raise ConfigError('model.titans.segment_size', t.segment_size,
                        f'a positive multiple of model.titans.chunk_size={t.chunk_size} (512 in the paper)')

  @classmethod
  def check_sequence_sharding(cls, config, shards):
    registry.check_divides_shard('model.titans.segment_size', config.model.titans.segment_size, config, shards)

  @classmethod
  def flops(cls, config, seq_len):
    """Each segment's attention: C queries over P + 2C keys, causal over the 2C; and the memory on ỹ."""
    m = config.model
    c = min(m.titans.segment_size, seq_len)
    head_dim = m.head_dim or m.d_model // m.num_heads
    pairs = seq_len * (m.attention.persistent_tokens + c + 1)
    return 4.0 * pairs * m.num_heads * head_dim + Titans.flops(config, seq_len)

  def _read_tokens(self, h, positions, dtype):
    """Keys and values [B, T, KV, D] of the memory reads h [B, T, H, D] as tokens of the segment attention."""
    tokens = self.read_out(h.astype(dtype))
    return rope(self.attn.k(tokens), positions, self.attn.rope_theta), self.attn.v(tokens)

  def _attend(self, q, kh, vh, kx, vx, visible, prefix):
    """ỹ: queries q over [prefix ‖ memory reads ‖ tokens]; `visible` [B or 1, Tq, C] says which of the segment's
    reads and tokens each query sees (the same for both); the prefix is seen by all."""
    pk, pv = ([], []) if prefix is None else ([prefix[0]], [prefix[1]])
    mask = jnp.concatenate([jnp.ones(visible.shape[:2] + (sum(p.shape[1] for p in pk),), bool), visible, visible], -1)
    join = lambda parts: jnp.concatenate([a.astype(q.dtype) for a in parts], axis=1)
    return self.attn.o(masked(q, join(pk + [kh, kx]), join(pv + [vh, vx]), mask))

  def init_cache(self, batch: int, max_len: int = 0, dtype=jnp.float32):
    """The segment in progress: keys and values of its memory reads and tokens, how many there are, the memory
    its reads come from, and the memory mixer's own cache (the memory trained on ỹ so far)."""
    del max_len
    kv_shape = (batch, self.segment) + self.attn.k.kernel.shape[1:]
    kv = {name: jnp.zeros(kv_shape, dtype) for name in ('kh', 'vh', 'kx', 'vx')}
    conv = {} if self.attn.conv is None else {
        'conv': jnp.zeros((batch, self.attn.conv.size - 1, self.attn.conv.kernel.shape[1]), dtype)}
    return {**kv, **conv, 'count': jnp.zeros((), jnp.int32),
            'read_weights': self.memory.initial_weights(batch),
            'memory': self.memory.init_cache(batch, 0, dtype)}

  def _decode(self, x, positions, cache):
    """One token at a time through the segment in progress; at its end the memory trained on it becomes the one
    the next segment reads (the training form's segment boundary)."""
    attn, spec, c = self.attn, self.memory.spec, self.segment
    prefix = attn.prefix(x.shape[0])

    def one(cache, xs):
      x_t, pos_t = xs[0][:, None], xs[1][:, None]                         # [B, 1, d], [B, 1]
      n = cache['count']
      r = l2_normalize(jax.nn.silu(self.read_q(x_t)))
      kh, vh = self._read_tokens(memory_lib.apply(spec, [w[:, None] for w in cache['read_weights']], r), pos_t,
                                 x_t.dtype)
      q, k, v, conv = attn.projections(x_t, None, cache.get('conv'))
      new = {'kh': kh, 'vh': vh, 'kx': rope(k, pos_t, attn.rope_theta), 'vx': v}
      put = lambda buf, val: jax.lax.dynamic_update_slice_in_dim(buf, val.astype(buf.dtype), n, axis=1)
      kv = {name: put(cache[name], val) for name, val in new.items()}
      q = rope(q, pos_t, attn.rope_theta)
      y = self._attend(q, kv['kh'], kv['vh'], kv['kx'], kv['vx'], jnp.arange(c)[None, None, :] <= n, prefix)
      m, memory_cache = self.memory(y, positions=pos_t, segment_ids=None, cache=cache['memory'])
      end = n + 1 == c
      read_weights = [jnp.where(end, w_new, w) for w_new, w in
                      zip(memory_cache['memory']['weights'], cache['read_weights'])]
      conv = {} if conv is None else {'conv': conv}
      return ({**kv, **conv, 'count': jnp.where(end, 0, n + 1), 'read_weights': read_weights,
               'memory': memory_cache},
              self.gate(y, m)[:, 0])

    cache, out = jax.lax.scan(one, cache, (jnp.moveaxis(x, 1, 0), jnp.moveaxis(positions, 1, 0)))
    return jnp.moveaxis(out, 0, 1), cache

  def __call__(self, x, *, positions, segment_ids, cache=None):
    if cache is not None:
      return self._decode(x, positions, cache)
    b = x.shape[0]
    attn = self.attn
    qa, ka, va, _ = attn.projections(x, segment_ids)          # with the attention's short convolution, if any
    qa, ka = rope(qa, positions, attn.rope_theta), rope(ka, positions, attn.rope_theta)
    qr = l2_normalize(jax.nn.silu(self.read_q(x)))
    k_conv = self.memory.conv.size - 1
    # What runs through the segments: the memory, the memory's convolution cache and the ids the cache came from.
    start = (init_state(self.memory.spec, [w[...] for w in self.memory.memory], b),
             jnp.zeros((b, k_conv, self.memory.conv.kernel.shape[1]), x.dtype),
             jnp.full((b, max(k_conv, 1)), -2, jnp.int32))
    arrays = (x, qa, ka, va, qr, positions)
    mesh = sequence_mesh()
    if mesh is not None:
      # Each device holds whole segments; the memory is handed from device to device (longctx.parallel.context).
      graph, params = nnx.split(self)
      form = lambda *a, shared: nnx.merge(graph, shared)._segments(*a)
      return handed_recurrence(form, arrays, start, segment_ids, mesh=mesh, shared=params), None
    return self._segments(*arrays, start, start, segment_ids)[0], None

  def _segments(self, x, qa, ka, va, qr, positions, carry, fresh, segment_ids):
    """The segment loop over rows [B, T, ...] from `carry` (memory, convolution cache, its ids); `fresh` is the
    carry at a document start. Returns (outputs [B, T, d_model], the carry after the last segment)."""
    b, t, _ = x.shape
    c = min(self.segment, t)
    ids = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    pad = lambda z, v=0: pad_to_multiple(z, c, value=v)
    n = pad(ids).shape[1] // c
    seg_major = lambda z: jnp.moveaxis(z.reshape((b, n, c) + z.shape[2:]), 1, 0)
    xs = tuple(seg_major(pad(z)) for z in (x, qa, ka, va, qr, positions))
    ids_s = seg_major(pad(ids, -1))                          # padding is a document of its own, dropped at the end
    prefix = self.attn.prefix(b)
    spec = self.memory.spec
    initial = [w[...] for w in self.memory.memory]
    start = fresh[0]

    def body(carry, inputs):
      state, conv_cache, conv_ids = carry
      x_s, q_s, k_s, v_s, r_s, pos_s, id_s = inputs
      new_doc = id_s[:, 0] != conv_ids[:, -1]
      state = jax.tree.map(lambda s0, s: jnp.where(new_doc.reshape((b,) + (1,) * (s.ndim - 1)), s0, s), start, state)
      h = memory_lib.apply(spec, [w[:, None] for w in state['weights']], r_s)
      if segment_ids is not None:
        # Tokens whose document began inside this segment read the initial memory.
        began = jnp.cumsum(jnp.pad(id_s[:, 1:] != id_s[:, :-1], ((0, 0), (1, 0))), axis=1) > 0
        h = jnp.where(began[..., None, None], memory_lib.apply(spec, [w[None, None] for w in initial], r_s), h)
      kh, vh = self._read_tokens(h, pos_s, x.dtype)
      idx = jnp.arange(c)
      inside = (idx[None, :] <= idx[:, None])[None] & (id_s[:, :, None] == id_s[:, None, :])
      y = self._attend(q_s, kh, vh, k_s, v_s, inside, prefix)
      k_conv = conv_cache.shape[1]
      q, k, v, g, conv_cache = self.memory.features(y, id_s, conv_cache, conv_ids[:, -k_conv:] if k_conv else None)
      o, state = self.memory.lmm(q, k, v, g, state, id_s, self.memory.initial_weights(b))
      out = self.gate(y, self.memory.project(o, y))
      return (state, conv_cache, id_s[:, -conv_ids.shape[1]:]), out

    carry, out = jax.lax.scan(jax.checkpoint(body), carry, xs + (ids_s,))
    return jnp.moveaxis(out, 0, 1).reshape(b, n * c, -1)[:, :t], carry

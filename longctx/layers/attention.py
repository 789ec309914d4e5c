"""Causal softmax attention mixer: RoPE, grouped-query heads, optional sliding window, packed documents."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ConfigError
from longctx.layers import registry
from longctx.layers.common import Dense, param, rope
from longctx.layers.conv import ShortConv
from longctx.ops.attention import attention, cached, prefixed
from longctx.parallel import context
from longctx.parallel.rules import constrain, sequence_mesh


@registry.register('attention')
class Attention(registry.Mixer):
  """softmax(q kᵀ/√d + causal/window/segment mask) v with q, k rotated by RoPE (Vaswani et al. 2017; Su et al. 2021).

  Config (`model.*`): d_model, num_heads, num_kv_heads (GQA: kv heads are shared by num_heads/num_kv_heads query
  heads), head_dim (0 = d_model / num_heads), rope_theta, attention.window (0 = full causal), attention.impl,
  attention.chunk_size and attention.max_segments (see longctx.ops.attention). Output projection initialised with std 0.02/√(2·layers)
  (GPT-2's residual scaling).

  `model.attention.persistent_tokens` P > 0 prepends P learned tokens (Titans' persistent memory; attention sinks):
  d_model vectors that pass through this layer's key and value projections without rotation, seen by every query
  whatever its window or document. Such layers take the blocked dense path `longctx.ops.attention.prefixed`.

  `model.attention.conv_size` K > 0 passes q, k and v through a short causal depthwise convolution over the last K
  tokens of the document before RoPE (the short convolution of the linear mixers; Zoology's MQAR baselines put one
  in front of attention, which then forms induction heads without first learning to attend to the previous token).

  Under `parallel.sequence` > 1 the row is sharded over the mesh's sequence axis in the data loader's balanced
  token order and attention runs as `parallel.context` (ring | all_gather, `longctx.parallel.context`), masked by
  each token's document and in-document position; its blocks run on cuDNN where it applies (impl auto or cudnn: GPU,
  rows of one document, no window, zigzag or natural order), else in chunks of `chunk_size`; persistent tokens are
  one more block every device holds.
  """
  context_parallel = True

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    m = config.model
    d, h, kv = m.d_model, m.num_heads, m.num_kv_heads
    hd = m.head_dim or d // h
    self.q = Dense((d,), (h, hd), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.k = Dense((d,), (kv, hd), ('embed', 'kv_heads', 'head_dim'), rngs=rngs)
    self.v = Dense((d,), (kv, hd), ('embed', 'kv_heads', 'head_dim'), rngs=rngs)
    self.o = Dense((h, hd), (d,), ('heads', 'head_dim', 'embed'), rngs=rngs,
                   std=0.02 / (2 * m.num_layers) ** 0.5)
    self.rope_theta = m.rope_theta
    self.window = self.window_of(config)
    self.impl = m.attention.impl
    self.chunk_size = m.attention.chunk_size
    self.max_segments = m.attention.max_segments
    self.context = config.parallel.get('context', 'ring')
    self.order = config.parallel.get('load_balance', 'zigzag')
    self.balance = config.parallel.get('balance_attention', False)
    n_p = m.attention.persistent_tokens
    self.persistent = param(rngs, (n_p, d), (None, 'embed'), 1.0) if n_p else None
    k_conv = m.attention.get('conv_size', 0)
    self.conv = ShortConv((h + 2 * kv) * hd, k_conv, (None,), rngs=rngs) if k_conv else None

  @staticmethod
  def window_of(config) -> int:
    return config.model.attention.window

  @classmethod
  def check_config(cls, config, layer_index):
    if config.model.rope_theta <= 0:
      raise ConfigError('model.rope_theta', config.model.rope_theta, 'a positive base')
    if config.model.attention.max_segments < 1:
      raise ConfigError('model.attention.max_segments', config.model.attention.max_segments, 'a positive count')
    if config.model.attention.get('conv_size', 0) < 0:
      raise ConfigError('model.attention.conv_size', config.model.attention.conv_size,
                        'a kernel size >= 0 (0: no short convolution)')
    if config.model.attention.persistent_tokens < 0:
      raise ConfigError('model.attention.persistent_tokens', config.model.attention.persistent_tokens,
                        'a count >= 0 (0: none; Titans uses 128)')

  @classmethod
  def flops(cls, config, seq_len):
    from longctx.train.flops import causal_pairs
    m = config.model
    head_dim = m.head_dim or m.d_model // m.num_heads
    pairs = causal_pairs(seq_len, cls.window_of(config)) + seq_len * m.attention.persistent_tokens
    return 4.0 * pairs * m.num_heads * head_dim

  def prefix(self, batch: int):
    """Keys and values of the persistent tokens [B, P, KV, D], or None."""
    if self.persistent is None:
      return None
    p = self.persistent[...][None]
    grow = lambda x: jnp.broadcast_to(x, (batch,) + x.shape[1:])
    return grow(self.k(p)), grow(self.v(p))

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
    """Keys and values of up to max_len tokens, and how many are filled."""
    shape = (batch, max_len) + self.k.kernel.shape[1:]
    cache = {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype), 'end': jnp.zeros((), jnp.int32)}
    if self.conv is not None:
      cache['conv'] = jnp.zeros((batch, self.conv.size - 1, self.conv.kernel.shape[1]), dtype)
    return cache

  def projections(self, x, segment_ids, conv_cache=None):
    """q [B, T, H, D], k and v [B, T, KV, D] before RoPE, and the new convolution cache."""
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.conv is None:
      return q, k, v, None
    b, t, h, d = q.shape
    kv = k.shape[2]
    qkv, conv_cache = self.conv(jnp.concatenate([a.reshape(b, t, -1) for a in (q, k, v)], -1), segment_ids,
                                conv_cache)
    q, k, v = jnp.split(qkv, [h * d, (h + kv) * d], axis=-1)
    return q.reshape(b, t, h, d), k.reshape(b, t, kv, d), v.reshape(b, t, kv, d), conv_cache

  def __call__(self, x, *, positions, segment_ids, cache=None):
    q, k, v, conv_cache = self.projections(x, segment_ids, None if cache is None else cache.get('conv'))
    q = rope(q, positions, self.rope_theta)
    k = rope(k, positions, self.rope_theta)
    if cache is not None:
      # Decoding one document: the new keys and values join the cache, the queries read it.
      end = cache['end']
      k_cache = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, end, 0, 0))
      v_cache = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, end, 0, 0))
      o = cached(q, k_cache, v_cache, end, window=self.window, prefix=self.prefix(x.shape[0]))
      new = {'k': k_cache, 'v': v_cache, 'end': end + x.shape[1]}
      if conv_cache is not None:
        new['conv'] = conv_cache
      return self.o(o), new
    q = constrain(q, ('batch', 'length', 'act_heads', None))
    k = constrain(k, ('batch', 'length', 'act_kv_heads', None))
    v = constrain(v, ('batch', 'length', 'act_kv_heads', None))
    prefix = self.prefix(x.shape[0])
    mesh = sequence_mesh()
    if mesh is not None:
      o = context.context_attention(q, k, v, positions, segment_ids, mesh=mesh, method=self.context,
                                    window=self.window, order=self.order, chunk_size=self.chunk_size,
                                    impl=self.impl if self.impl in ('auto', 'cudnn') else 'chunked', prefix=prefix,
                                    balance=self.balance)
    elif prefix is not None:
      o = prefixed(q, k, v, *(a.astype(k.dtype) for a in prefix), segment_ids, window=self.window,
                   block=self.chunk_size)
    else:
      o = attention(q, k, v, segment_ids, window=self.window, impl=self.impl, chunk_size=self.chunk_size,
                    max_segments=self.max_segments)
    return self.o(o), None


@registry.register('swa')
class SlidingWindowAttention(Attention):
  """Attention over the last `model.attention.swa_window` tokens: the local layers of hybrid stacks (Gated DeltaNet's
  H1/H2 use 2048)."""

  @staticmethod
  def window_of(config) -> int:
    return config.model.attention.swa_window

  @classmethod
  def check_config(cls, config, layer_index):
    super().check_config(config, layer_index)
    if config.model.attention.swa_window < 1:
      raise ConfigError('model.attention.swa_window', config.model.attention.swa_window, 'a positive window')

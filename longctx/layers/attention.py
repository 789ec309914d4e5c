"""Causal softmax attention mixer: RoPE, grouped-query heads, optional sliding window, packed documents."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ConfigError
from longctx.layers import registry
from longctx.layers.common import Dense, rope
from longctx.ops.attention import attention, cached
from longctx.parallel.rules import constrain


@registry.register('attention')
class Attention(registry.Mixer):
  """softmax(q kᵀ/√d + causal/window/segment mask) v with q, k rotated by RoPE (Vaswani et al. 2017; Su et al. 2021).

  Config (`model.*`): d_model, num_heads, num_kv_heads (GQA: kv heads are shared by num_heads/num_kv_heads query
  heads), head_dim (0 = d_model / num_heads), rope_theta, attention.window (0 = full causal), attention.impl,
  attention.chunk_size and attention.max_segments (see longctx.ops.attention). Output projection initialised with std 0.02/√(2·layers)
  (GPT-2's residual scaling).
  """

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

  @staticmethod
  def window_of(config) -> int:
    return config.model.attention.window

  @classmethod
  def check_config(cls, config, layer_index):
    if config.model.rope_theta <= 0:
      raise ConfigError('model.rope_theta', config.model.rope_theta, 'a positive base')
    if config.model.attention.max_segments < 1:
      raise ConfigError('model.attention.max_segments', config.model.attention.max_segments, 'a positive count')

  @classmethod
  def flops(cls, config, seq_len):
    from longctx.train.flops import causal_pairs
    m = config.model
    head_dim = m.head_dim or m.d_model // m.num_heads
    return 4.0 * causal_pairs(seq_len, cls.window_of(config)) * m.num_heads * head_dim

  def init_cache(self, batch: int, max_len: int, dtype=jnp.float32):
    """Keys and values of up to max_len tokens, and how many are filled."""
    shape = (batch, max_len) + self.k.kernel.shape[1:]
    return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype), 'end': jnp.zeros((), jnp.int32)}

  def __call__(self, x, *, positions, segment_ids, cache=None):
    q = rope(self.q(x), positions, self.rope_theta)
    k = rope(self.k(x), positions, self.rope_theta)
    v = self.v(x)
    if cache is not None:
      # Decoding one document: the new keys and values join the cache, the queries read it.
      end = cache['end']
      k_cache = jax.lax.dynamic_update_slice(cache['k'], k.astype(cache['k'].dtype), (0, end, 0, 0))
      v_cache = jax.lax.dynamic_update_slice(cache['v'], v.astype(cache['v'].dtype), (0, end, 0, 0))
      o = cached(q, k_cache, v_cache, end, window=self.window)
      return self.o(o), {'k': k_cache, 'v': v_cache, 'end': end + x.shape[1]}
    q = constrain(q, ('batch', 'length', 'act_heads', None))
    k = constrain(k, ('batch', 'length', 'act_kv_heads', None))
    v = constrain(v, ('batch', 'length', 'act_kv_heads', None))
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

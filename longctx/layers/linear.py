"""What the linear-attention mixers share: head sizes from `model.linear`, their checks, and the q/k/v and output
projections around the recurrence (y = W_o (RMSNorm(o) ⊙ gate)).

Config `model.linear`: num_heads (0 = model.num_heads), head_dim (0 = the attention head dim), expand_v (value head
dim = head_dim · expand_v), conv_size, chunk_size (of the chunked training form; divides data.seq_len).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ConfigError
from longctx.layers import registry
from longctx.layers.common import Dense, RMSNorm
from longctx.parallel.context import sharded_recurrence
from longctx.parallel.rules import sequence_mesh


def linear_dims(config):
  """(heads, key head dim, value head dim)."""
  m = config.model
  heads = m.linear.num_heads or m.num_heads
  dk = m.linear.head_dim or (m.head_dim or m.d_model // m.num_heads)
  return heads, dk, dk * m.linear.expand_v


def dt_bias_init(key, shape, low=1e-3, high=0.1):
  """Mamba's step-size bias: Δ ~ logU(low, high) at init, stored as softplus⁻¹(Δ)."""
  dt = jnp.exp(jax.random.uniform(key, shape, jnp.float32, math.log(low), math.log(high)))
  return dt + jnp.log(-jnp.expm1(-dt))


def check_linear_config(config):
  """The `model.linear` fields every linear mixer reads."""
  lin = config.model.linear
  if lin.num_heads < 0:
    raise ConfigError('model.linear.num_heads', lin.num_heads, 'a count >= 0 (0: model.num_heads)')
  if lin.head_dim < 0:
    raise ConfigError('model.linear.head_dim', lin.head_dim, 'a size >= 0 (0: the attention head dim)')
  if lin.expand_v < 1:
    raise ConfigError('model.linear.expand_v', lin.expand_v, 'a positive integer')
  if lin.conv_size < 1:
    raise ConfigError('model.linear.conv_size', lin.conv_size, 'a positive kernel size (4 in the papers)')
  chunk, seq = lin.chunk_size, config.data.seq_len
  if chunk < 1 or (seq > chunk and seq % chunk):
    raise ConfigError('model.linear.chunk_size', chunk, f'a positive divisor of data.seq_len={seq}')


def run_recurrence(form, arrays: tuple, segment_ids, cache, *, vector: bool = False, value_index: int = 2):
  """(outputs, final state or None) of `form(*arrays, initial_state=, segment_ids=)` from the cache's state; in
  training under a mesh that shards the sequence, across the devices by `longctx.parallel.context.sharded_recurrence`
  (no final state is kept there)."""
  mesh = sequence_mesh()
  if cache is None and mesh is not None:
    return sharded_recurrence(form, arrays, segment_ids, mesh=mesh, vector=vector, value_index=value_index), None
  return form(*arrays, initial_state=None if cache is None else cache['state'], segment_ids=segment_ids)


def decay_flops(config, seq_len: int, dk: int, dv: int, heads: int) -> float:
  """Forward FLOPs of a chunked decay form (scalar or per-channel gates), per sequence: per chunk of C tokens and
  head 2C²dk (QKᵀ) + 2C²dv (intra-chunk output) + 4C·dk·dv (state read and update)."""
  c = min(config.model.linear.chunk_size, seq_len)
  return float(seq_len * heads * (2 * c * dk + 2 * c * dv + 4 * dk * dv))


class LinearMixer(registry.Mixer):
  """Projections q, k [h, dk], v [h, dv], the per-head output norm and W_o; subclasses add their gates and state."""
  context_parallel = True
  natural_order = True      # under sequence sharding the row must keep its token order (parallel.load_balance=none)

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    del layer_index
    m = config.model
    self.heads, self.dk, self.dv = h, dk, dv = linear_dims(config)
    d = m.d_model
    self.q = Dense((d,), (h, dk), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.k = Dense((d,), (h, dk), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.v = Dense((d,), (h, dv), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.o_norm = RMSNorm(dv, eps=m.norm_eps)
    self.o = Dense((h, dv), (d,), ('heads', 'head_dim', 'embed'), rngs=rngs, std=0.02 / (2 * m.num_layers) ** 0.5)
    self.chunk_size = m.linear.chunk_size
    self.kernel = m.linear.kernel

  @classmethod
  def check_config(cls, config, layer_index):
    del layer_index
    check_linear_config(config)

  def state_cache(self, batch: int):
    return jnp.zeros((batch, self.heads, self.dk, self.dv), jnp.float32)

"""Linear attention with fixed per-head decays: RetNet and Lightning (TransNormerLLM / Lightning Attention).

    S_t = γ_h S_{t−1} + k_t v_tᵀ,   o_t = S_tᵀ q_t / √d_k           (longctx.ops.scalar_decay)

RetNet (Sun et al. 2023): γ_h = 1 − 2^{−5−h}; q, k rotated by RoPE (the paper's xPos is RoPE with a decay this
recurrence already applies); y = W_o (GroupNorm(o) ⊙ swish(W_g x)), GroupNorm per head as an RMSNorm.
Lightning (Qin et al. 2024): q, k, v = SiLU(W x); log γ_h = −2^{−8(h+1)/H} · (1 − l/(L−1) + 1e-5) for layer l of L
(TNL/MiniMax's geometric slopes, decaying less in deeper layers; for head counts that are not powers of two the
slopes follow the same formula rather than ALiBi's interleaving); y = W_o (RMSNorm(o) ⊙ σ(W_g x)).
The cache is {'state': fp32 S}.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx.layers import registry
from longctx.layers.common import Dense, rope
from longctx.layers.linear import LinearMixer, decay_flops, linear_dims, run_recurrence
from longctx.ops.scalar_decay import chunk_scalar_decay


# Decays are constants of the architecture, computed in numpy so that building a model under jit stays concrete.
def retnet_log_decay(heads: int) -> np.ndarray:
  return np.log1p(-2.0 ** (-5.0 - np.arange(heads)))


def lightning_log_decay(heads: int, layer: int, num_layers: int) -> np.ndarray:
  depth = 1.0 - layer / max(num_layers - 1, 1) + 1e-5
  return -(2.0 ** (-8.0 * (np.arange(heads) + 1) / heads)) * depth


class _FixedDecayMixer(LinearMixer):
  rotary = False

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    super().__init__(config, layer_index=layer_index, rngs=rngs)
    m = config.model
    self.gate = Dense((m.d_model,), (self.heads, self.dv), ('embed', 'heads', 'head_dim'), rngs=rngs)
    # Kept out of the parameters: a tuple is static to NNX, an array would be state.
    self.log_decay = tuple(float(x) for x in self.decay(self.heads, layer_index, m.num_layers))
    self.rope_theta = m.rope_theta

  @classmethod
  def flops(cls, config, seq_len):
    h, dk, dv = linear_dims(config)
    return decay_flops(config, seq_len, dk, dv, h)

  def features(self, x, positions):
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.rotary:
      return rope(q, positions, self.rope_theta), rope(k, positions, self.rope_theta), v
    return jax.nn.silu(q), jax.nn.silu(k), jax.nn.silu(v)

  def __call__(self, x, *, positions, segment_ids, cache=None):
    b, t, _ = x.shape
    q, k, v = self.features(x, positions)
    g = jnp.broadcast_to(jnp.asarray(self.log_decay, jnp.float32), (b, t, self.heads))
    form = functools.partial(chunk_scalar_decay, chunk_size=self.chunk_size, kernel=self.kernel)
    o, state = run_recurrence(form, (q, k, v, g), segment_ids, cache)
    y = self.o(self.o_norm(o) * self.output_gate(self.gate(x)))
    return y, (None if cache is None else {'state': state})

  def init_cache(self, batch: int, max_len: int = 0, dtype=jnp.float32):
    del max_len, dtype
    return {'state': self.state_cache(batch)}


@registry.register('retnet')
class RetNet(_FixedDecayMixer):
  """Retention with γ_h = 1 − 2^{−5−h}, RoPE on q and k, a swish output gate (module docstring)."""
  rotary = True

  @staticmethod
  def decay(heads, layer, num_layers):
    del layer, num_layers
    return retnet_log_decay(heads)

  @staticmethod
  def output_gate(z):
    return jax.nn.silu(z)


@registry.register('lightning')
class Lightning(_FixedDecayMixer):
  """Lightning attention: SiLU features, depth-dependent geometric decays, a sigmoid output gate."""

  @staticmethod
  def decay(heads, layer, num_layers):
    return lightning_log_decay(heads, layer, num_layers)

  @staticmethod
  def output_gate(z):
    return jax.nn.sigmoid(z)

"""DeltaNet and Gated DeltaNet mixers: the (gated) delta rule with its papers' parametrisation.

    q, k, v = SiLU(ShortConv(W x));  q, k ← q/‖q‖, k/‖k‖;  β = σ(W_β x)
    DeltaNet (Yang et al. 2024):        S_t = (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ
    Gated DeltaNet (Yang et al. 2025):  S_t = α_t (I − β_t k_t k_tᵀ) S_{t−1} + β_t k_t v_tᵀ,
                                        log α_t = −exp(A_log) · softplus(W_a x_t + dt_bias)  (Mamba2's decay)
    o_t = S_tᵀ q_t / √d_k;  y = W_o (RMSNorm(o) ⊙ SiLU(W_g x))  (DeltaNet: no gate, RMSNorm(o) alone)

Config `model.linear` (longctx.layers.linear). Initialisation as flash-linear-attention's: A ~ U(0, 16),
dt ~ logU(1e-3, 0.1) with dt_bias its inverse softplus. The cache is {'conv': [B, K−1, channels], 'state': fp32 S}.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.layers import registry
from longctx.layers.common import Dense, l2_normalize
from longctx.layers.conv import ShortConv
from longctx.layers.linear import LinearMixer, dt_bias_init, linear_dims, run_recurrence
from longctx.ops.delta_rule import chunk_delta_rule


class _DeltaRuleMixer(LinearMixer):
  gated = False

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    super().__init__(config, layer_index=layer_index, rngs=rngs)
    m = config.model
    h, dk, dv, d = self.heads, self.dk, self.dv, m.d_model
    self.conv = ShortConv(h * (2 * dk + dv), m.linear.conv_size, ('heads',), rngs=rngs)
    self.beta = Dense((d,), (h,), ('embed', 'heads'), rngs=rngs)
    if self.gated:
      self.a = Dense((d,), (h,), ('embed', 'heads'), rngs=rngs)
      self.gate = Dense((d,), (h, dv), ('embed', 'heads', 'head_dim'), rngs=rngs)
      self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (h,), jnp.float32, 1e-4, 16.0)),
                             logical_axes=('heads',))
      self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), (h,)), logical_axes=('heads',))

  @classmethod
  def flops(cls, config, seq_len):
    """Chunked form, forward, per sequence: per chunk of C tokens and head 4C²dk (KKᵀ, QKᵀ) + C²(dk+dv) (two
    triangular solves) + 2C²dv (intra-chunk output) + 6C·dk·dv (state reads and update)."""
    h, dk, dv = linear_dims(config)
    c = min(config.model.linear.chunk_size, seq_len)
    per_token = 4 * c * dk + c * (dk + dv) + 2 * c * dv + 6 * dk * dv
    return float(seq_len * h * per_token)

  def __call__(self, x, *, positions, segment_ids, cache=None):
    del positions
    b, t, _ = x.shape
    h, dk, dv = self.heads, self.dk, self.dv
    qkv = jnp.concatenate([self.q(x).reshape(b, t, -1), self.k(x).reshape(b, t, -1), self.v(x).reshape(b, t, -1)],
                          axis=-1)
    qkv, conv_cache = self.conv(qkv, segment_ids, None if cache is None else cache['conv'])
    qkv = jax.nn.silu(qkv)
    q, k, v = jnp.split(qkv, [h * dk, 2 * h * dk], axis=-1)
    q, k = l2_normalize(q.reshape(b, t, h, dk)), l2_normalize(k.reshape(b, t, h, dk))
    v = v.reshape(b, t, h, dv)
    beta = jax.nn.sigmoid(self.beta(x).astype(jnp.float32))
    g = None
    if self.gated:
      g = -jnp.exp(self.A_log[...]) * jax.nn.softplus(self.a(x).astype(jnp.float32) + self.dt_bias[...])
    if g is None:
      form = functools.partial(chunk_delta_rule, g=None, chunk_size=self.chunk_size, kernel=self.kernel)
      o, state = run_recurrence(form, (q, k, v, beta), segment_ids, cache)
    else:
      form = functools.partial(chunk_delta_rule, chunk_size=self.chunk_size, kernel=self.kernel)
      o, state = run_recurrence(form, (q, k, v, beta, g), segment_ids, cache)
    o = self.o_norm(o)
    if self.gated:
      o = o * jax.nn.silu(self.gate(x))
    y = self.o(o)
    return y, (None if cache is None else {'conv': conv_cache, 'state': state})

  def init_cache(self, batch: int, max_len: int = 0, dtype=jnp.float32):
    del max_len  # a recurrent state does not grow
    channels = self.heads * (2 * self.dk + self.dv)
    return {'conv': jnp.zeros((batch, self.conv.size - 1, channels), dtype), 'state': self.state_cache(batch)}


@registry.register('deltanet')
class DeltaNet(_DeltaRuleMixer):
  """The delta rule without decay (module docstring)."""
  gated = False


@registry.register('gated_deltanet')
class GatedDeltaNet(_DeltaRuleMixer):
  """The delta rule with Mamba2's data-dependent decay and an output gate (module docstring)."""
  gated = True

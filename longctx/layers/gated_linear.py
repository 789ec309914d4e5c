"""Linear attention with data-dependent per-channel forget gates: GLA, HGRN2 (matrix state) and HGRN (vector state).

GLA (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient Training"):
    S_t = Diag(α_t) S_{t−1} + k_t v_tᵀ,   log α_t = logsigmoid(W₂ W₁ x_t + b) / 16   (rank 16)
    o_t = S_tᵀ q_t / √d_k;   y = W_o (RMSNorm(o) ⊙ swish(W_g x))                   (no short convolution)
HGRN2 (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion"): the GLA recurrence with a tied gate,
    α_t = lb + (1 − lb) σ(W_f x_t),   k_t = 1 − α_t,   q_t = swish(W_q x_t),   v_t = W_v x_t
    y = W_o RMSNorm(o)   (the norm per head)
HGRN (Qin et al. 2023, "Hierarchically Gated Recurrent Neural Network"), real-valued as flash-linear-attention:
    f_t = lb + (1 − lb) σ(W_f x_t),   i_t = SiLU(W_i x_t) ⊙ (1 − f_t),   h_t = f_t ⊙ h_{t−1} + i_t
    y = W_o (RMSNorm(h) ⊙ swish(W_g x))
lb is the layer's forget-gate lower bound: the model keeps one row of logits per HGRN/HGRN2 layer, takes a softmax
over those layers and a cumulative sum, minus the first row, so the bound is 0 in the first such layer and rises with
depth (`depth_lower_bound`); the mixers receive log lb (`log_lower_bound`, None for no bound). The per-channel
recurrences are `longctx.ops.channel_decay`. Caches: {'state': fp32}.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.layers import registry
from longctx.layers.common import Dense, RMSNorm
from longctx.layers.linear import LinearMixer, check_linear_config, decay_flops, linear_dims, run_recurrence
from longctx.ops.channel_decay import chunk_channel_decay, scan_vector_decay

GLA_GATE_RANK = 16
GLA_GATE_NORMALIZER = 16.0


def bounded_forget_gate(logits, log_lower_bound):
  """(log α, 1 − α) for α = lb + (1 − lb) σ(logits), in fp32, from log lb (None: lb = 0).

  log α = logaddexp(log σ(x), log lb + log σ(−x)) (α = σ(x) + lb σ(−x)). With a bound the derivatives are written
  out as exponentials of sums of logs, each at most 0, so no derivative divides by α or lb and none can form 0/0 or
  ∞·0 whatever an optimising compiler does to them (XLA's GPU simplifier turned autodiff's forms of
  log(lb + (1 − lb)σ(x)) into non-finite gradients)."""
  logits = logits.astype(jnp.float32)
  if log_lower_bound is None:
    return jax.nn.log_sigmoid(logits), jax.nn.sigmoid(-logits)
  log_lb = jnp.broadcast_to(log_lower_bound.astype(jnp.float32), logits.shape)
  return _bounded_gate(logits, log_lb)


@jax.custom_vjp
def _bounded_gate(x, log_lb):
  return _bounded_gate_fwd(x, log_lb)[0]


def _bounded_gate_fwd(x, log_lb):
  log_sig, log_sig_neg = jax.nn.log_sigmoid(x), jax.nn.log_sigmoid(-x)
  log_alpha = jnp.logaddexp(log_sig, log_lb + log_sig_neg)
  log_one_minus_lb = jnp.log(-jnp.expm1(jnp.minimum(log_lb, -1e-30)))
  one_minus_alpha = jnp.exp(log_one_minus_lb + log_sig_neg)
  return (log_alpha, one_minus_alpha), (log_sig, log_sig_neg, log_alpha, log_lb, log_one_minus_lb)


def _bounded_gate_bwd(res, cotangents):
  log_sig, log_sig_neg, log_alpha, log_lb, log_one_minus_lb = res
  d_log_alpha, d_one_minus = cotangents
  log_slope = log_one_minus_lb + log_sig + log_sig_neg                      # log dα/dx = log (1 − lb) σ(x) σ(−x)
  log_pull = log_lb + log_sig_neg                                           # log ∂α/∂ log lb = log lb σ(−x)
  d_x = d_log_alpha * jnp.exp(log_slope - log_alpha) - d_one_minus * jnp.exp(log_slope)
  d_log_lb = d_log_alpha * jnp.exp(log_pull - log_alpha) - d_one_minus * jnp.exp(log_pull)
  return d_x, d_log_lb


_bounded_gate.defvjp(_bounded_gate_fwd, _bounded_gate_bwd)


class _ChannelDecayMixer(LinearMixer):

  @classmethod
  def flops(cls, config, seq_len):
    h, dk, dv = linear_dims(config)
    return decay_flops(config, seq_len, dk, dv, h)

  def init_cache(self, batch: int, max_len: int = 0, dtype=jnp.float32):
    del max_len, dtype
    return {'state': self.state_cache(batch)}

  def recurrence(self, q, k, v, g, segment_ids, cache):
    form = functools.partial(chunk_channel_decay, chunk_size=self.chunk_size, kernel=self.kernel)
    o, state = run_recurrence(form, (q, k, v, g), segment_ids, cache)
    return o, (None if cache is None else {'state': state})


@registry.register('gla')
class GLA(_ChannelDecayMixer):
  """Gated linear attention: a low-rank per-key-channel forget gate and a swish output gate (module docstring)."""

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    super().__init__(config, layer_index=layer_index, rngs=rngs)
    d, h, dk, dv = config.model.d_model, self.heads, self.dk, self.dv
    self.gate_down = Dense((d,), (GLA_GATE_RANK,), ('embed', None), rngs=rngs)
    self.gate_up = Dense((GLA_GATE_RANK,), (h, dk), (None, 'heads', 'head_dim'), rngs=rngs)
    self.gate_bias = nnx.Param(jnp.zeros((h, dk), jnp.float32), logical_axes=('heads', 'head_dim'))
    self.gate = Dense((d,), (h, dv), ('embed', 'heads', 'head_dim'), rngs=rngs)

  def __call__(self, x, *, positions, segment_ids, cache=None):
    del positions
    logits = self.gate_up(self.gate_down(x)).astype(jnp.float32) + self.gate_bias[...]
    g = jax.nn.log_sigmoid(logits) / GLA_GATE_NORMALIZER
    o, cache = self.recurrence(self.q(x), self.k(x), self.v(x), g, segment_ids, cache)
    return self.o(self.o_norm(o) * jax.nn.silu(self.gate(x))), cache


@registry.register('hgrn2')
class HGRN2(_ChannelDecayMixer):
  """HGRN2: the forget gate, bounded below by depth, doubles as the key (k = 1 − α). The key projection of the
  shared base serves as W_f."""
  depth_lower_bound = True

  @classmethod
  def lower_bound_shape(cls, config):
    h, dk, _ = linear_dims(config)
    return (h, dk)

  def __call__(self, x, *, positions, segment_ids, cache=None, log_lower_bound=None):
    del positions
    g, k = bounded_forget_gate(self.k(x), log_lower_bound)
    q = jax.nn.silu(self.q(x))
    o, cache = self.recurrence(q, k.astype(q.dtype), self.v(x), g, segment_ids, cache)
    return self.o(self.o_norm(o)), cache


@registry.register('hgrn')
class HGRN(registry.Mixer):
  """HGRN's gated vector recurrence over d_model channels (module docstring)."""
  depth_lower_bound = True
  context_parallel = True
  natural_order = True

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    del layer_index
    m = config.model
    d = m.d_model
    self.i = Dense((d,), (d,), ('embed', 'mlp'), rngs=rngs)
    self.f = Dense((d,), (d,), ('embed', 'mlp'), rngs=rngs)
    self.gate = Dense((d,), (d,), ('embed', 'mlp'), rngs=rngs)
    self.o_norm = RMSNorm(d, eps=m.norm_eps)
    self.o = Dense((d,), (d,), ('mlp', 'embed'), rngs=rngs, std=0.02 / (2 * m.num_layers) ** 0.5)

  @classmethod
  def check_config(cls, config, layer_index):
    del layer_index
    check_linear_config(config)

  @classmethod
  def lower_bound_shape(cls, config):
    return (config.model.d_model,)

  @classmethod
  def flops(cls, config, seq_len):
    """The scan: a multiply-add per channel and token (and as much again for the scan's upsweep)."""
    return float(4 * seq_len * config.model.d_model)

  def __call__(self, x, *, positions, segment_ids, cache=None, log_lower_bound=None):
    del positions
    g, one_minus_f = bounded_forget_gate(self.f(x), log_lower_bound)
    i = jax.nn.silu(self.i(x).astype(jnp.float32)) * one_minus_f
    h, state = run_recurrence(scan_vector_decay, (i, g), segment_ids, cache, vector=True, value_index=0)
    y = self.o(self.o_norm(h.astype(x.dtype)) * jax.nn.silu(self.gate(x)))
    return y, (None if cache is None else {'state': state})

  def init_cache(self, batch: int, max_len: int = 0, dtype=jnp.float32):
    del max_len, dtype
    return {'state': jnp.zeros((batch, self.o_norm.scale.shape[0]), jnp.float32)}

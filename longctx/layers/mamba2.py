"""Mamba2 (Dao & Gu 2024, "Transformers are SSMs"): the SSD layer, a selective state space with a scalar decay per
head, computed by the chunked scalar-decay op (`longctx.ops.scalar_decay`).

    x, B, C = SiLU(ShortConv(W_x u, W_B u, W_C u));   Δ_t = softplus(W_Δ u_t + dt_bias);   A = −exp(A_log)
    S_t = exp(Δ_t A) S_{t−1} + Δ_t B_t x_tᵀ,   y_t = S_tᵀ C_t + D ⊙ x_t      (per head; B, C shared: one group)
    out = W_o RMSNorm(y ⊙ SiLU(W_z u))                                       (the norm over all heads together)

Sizes from `model.linear`: heads, state size N = head_dim, head dim P = head_dim · expand_v. Initialisation as
mamba_ssm's: A ~ U(1, 16), Δ ~ logU(1e-3, 0.1) with dt_bias its inverse softplus, D = 1. The cache is
{'conv': [B, K−1, channels], 'state': fp32 S}.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.layers import registry
from longctx.layers.common import Dense, RMSNorm
from longctx.layers.conv import ShortConv
from longctx.layers.linear import check_linear_config, decay_flops, dt_bias_init, linear_dims, run_recurrence
from longctx.ops.scalar_decay import chunk_scalar_decay


@registry.register('mamba2')
class Mamba2(registry.Mixer):
  """The SSD layer (module docstring)."""
  context_parallel = True
  natural_order = True      # under sequence sharding the row must keep its token order

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    del layer_index
    m = config.model
    d = m.d_model
    self.heads, self.state_dim, self.head_dim = h, n, p = linear_dims(config)
    self.x = Dense((d,), (h, p), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.z = Dense((d,), (h, p), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.bc = Dense((d,), (2 * n,), ('embed', None), rngs=rngs)
    self.dt = Dense((d,), (h,), ('embed', 'heads'), rngs=rngs)
    self.conv = ShortConv(h * p + 2 * n, m.linear.conv_size, (None,), rngs=rngs)
    self.A_log = nnx.Param(jnp.log(jax.random.uniform(rngs.params(), (h,), jnp.float32, 1.0, 16.0)),
                           logical_axes=('heads',))
    self.dt_bias = nnx.Param(dt_bias_init(rngs.params(), (h,)), logical_axes=('heads',))
    self.D = nnx.Param(jnp.ones((h,), jnp.float32), logical_axes=('heads',))
    self.norm = RMSNorm(h * p, eps=m.norm_eps)
    self.o = Dense((h * p,), (d,), ('mlp', 'embed'), rngs=rngs, std=0.02 / (2 * m.num_layers) ** 0.5)
    self.chunk_size = m.linear.chunk_size
    self.kernel = m.linear.kernel

  @classmethod
  def check_config(cls, config, layer_index):
    del layer_index
    check_linear_config(config)

  @classmethod
  def flops(cls, config, seq_len):
    h, n, p = linear_dims(config)
    return decay_flops(config, seq_len, n, p, h)

  def __call__(self, u, *, positions, segment_ids, cache=None):
    del positions
    b, t, _ = u.shape
    h, n, p = self.heads, self.state_dim, self.head_dim
    xbc = jnp.concatenate([self.x(u).reshape(b, t, h * p), self.bc(u)], axis=-1)
    xbc, conv_cache = self.conv(xbc, segment_ids, None if cache is None else cache['conv'])
    xbc = jax.nn.silu(xbc)
    x = xbc[..., :h * p].reshape(b, t, h, p)
    B, C = xbc[..., h * p:h * p + n], xbc[..., h * p + n:]
    dt = jax.nn.softplus(self.dt(u).astype(jnp.float32) + self.dt_bias[...])          # [B, T, H]
    g = -jnp.exp(self.A_log[...]) * dt
    q = jnp.broadcast_to(C[:, :, None, :], (b, t, h, n))
    k = (B[:, :, None, :].astype(jnp.float32) * dt[..., None]).astype(x.dtype)
    form = functools.partial(chunk_scalar_decay, scale=1.0, chunk_size=self.chunk_size, kernel=self.kernel)
    y, state = run_recurrence(form, (q, k, x, g), segment_ids, cache)
    y = y + x * self.D[...].astype(x.dtype)[:, None]
    y = (y * jax.nn.silu(self.z(u))).reshape(b, t, h * p)
    return self.o(self.norm(y)), (None if cache is None else {'conv': conv_cache, 'state': state})

  def init_cache(self, batch: int, max_len: int = 0, dtype=jnp.float32):
    del max_len
    channels = self.heads * self.head_dim + 2 * self.state_dim
    return {'conv': jnp.zeros((batch, self.conv.size - 1, channels), dtype),
            'state': jnp.zeros((batch, self.heads, self.state_dim, self.head_dim), jnp.float32)}

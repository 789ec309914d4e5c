"""Titans' neural long-term memory as a sequence mixer (Behrouz, Zhong, Mirrokni 2025, "Titans: Learning to
Memorize at Test Time"): the LMM alone, `model.pattern = 'titans'`.

    q, k, v = SiLU(ShortConv(W_{q,k,v} x));  q, k ← q/‖q‖, k/‖k‖
    θ_t = max_lr · σ(W_θ x_t),  η_t = σ(W_η x_t),  α_t = σ(W_α x_t)                     (per head)
    S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t−1}; k_t, v_t),  M_t = (1 − α_t) M_{t−1} + S_t,  ℓ = ‖M(k) − v‖²
    o_t = M_t(q_t);  y = W_o (RMSNorm(o) ⊙ SiLU(W_g x))

M is a per-head MLP (`model.titans.memory_depth`, expansion, activation; residual around a parameter-free
LayerNorm for depth ≥ 2) whose initial weights are learned. Training uses the chunk-parallel form
(`longctx.ops.titans.chunk_lmm`: gradients of a chunk of `model.titans.chunk_size` tokens at the memory the last
chunk left); packed documents each start from the initial memory. The forgetting gate starts near 0 (bias −4) and
the momentum gate near 0.5.

Decoding follows the same chunk semantics: the cache holds the memory at the last chunk boundary and the tokens of
the chunk in progress; each new token re-reads that partial chunk (at most chunk_size tokens) and the memory
advances when the chunk fills, so cached decoding equals the full forward. The cache is
{'conv', 'memory': {'weights', 'momentum'}, 'k', 'v', 'theta', 'eta', 'alpha', 'delta' (the partial chunk), 'count'}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.config import ConfigError
from longctx.layers import registry
from longctx.layers.common import Dense, RMSNorm, l2_normalize
from longctx.layers.conv import ShortConv
from longctx.ops.titans import MemorySpec, chunk_lmm, init_state
from longctx.ops.titans.memory import ACTIVATIONS, OBJECTIVES, RETENTIONS
from longctx.parallel.context import handed_recurrence
from longctx.parallel.rules import current_mesh


def titans_dims(config):
  m = config.model
  heads = m.titans.num_heads or m.num_heads
  return heads, m.titans.head_dim or (m.head_dim or m.d_model // m.num_heads)


def memory_spec(config) -> MemorySpec:
  t = config.model.titans
  _, d = titans_dims(config)
  return MemorySpec(dk=d, dv=d, depth=t.memory_depth, expansion=t.memory_expansion, activation=t.activation,
                    grad_clip=t.grad_clip, objective=t.objective, p=t.p, retention=t.retention, q=t.q, l1=t.l1)


GATES = ('theta', 'eta', 'alpha', 'delta')


@registry.register('titans')
class Titans(registry.Mixer):
  """The long-term memory module (module docstring)."""
  context_parallel = True
  natural_order = True      # under sequence sharding the memory is handed from shard to shard in token order

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    del layer_index
    m = config.model
    t = m.titans
    self.heads, self.head_dim = h, d = titans_dims(config)
    self.spec = memory_spec(config)
    dm = m.d_model
    self.qkv = Dense((dm,), (3, h, d), ('embed', None, 'heads', 'head_dim'), rngs=rngs)
    self.conv = ShortConv(3 * h * d, t.conv_size, ('heads',), rngs=rngs)
    # θ, η, α logits (and Huber's δ, through softplus, for the 'huber' objective).
    n_gates = 4 if t.objective == 'huber' else 3
    self.gates = Dense((dm,), (n_gates, h), ('embed', None, 'heads'), rngs=rngs, std=0.02)
    self.gate_bias = nnx.Param(jnp.asarray([[0.0] * h, [0.0] * h, [-4.0] * h, [0.0] * h][:n_gates], jnp.float32),
                               logical_axes=(None, 'heads'))
    self.memory = nnx.List([
        nnx.Param(jax.random.normal(rngs.params(), (h, i, o), jnp.float32) * i ** -0.5,
                  logical_axes=('heads', None, None)) for i, o in self.spec.layer_shapes()])
    self.gate = Dense((dm,), (h, d), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.o_norm = RMSNorm(d, eps=m.norm_eps)
    self.o = Dense((h, d), (dm,), ('heads', 'head_dim', 'embed'), rngs=rngs, std=0.02 / (2 * m.num_layers) ** 0.5)
    self.chunk_size = t.chunk_size
    self.max_lr = t.max_lr

  @classmethod
  def check_config(cls, config, layer_index):
    del layer_index
    t = config.model.titans
    checks = [
        ('memory_depth', t.memory_depth >= 1, 'a depth >= 1 (1: a linear memory)'),
        ('memory_expansion', t.memory_expansion >= 1, 'a positive integer'),
        ('activation', t.activation in ACTIVATIONS, f'one of {", ".join(ACTIVATIONS)}'),
        ('chunk_size', t.chunk_size >= 1, 'a positive chunk length (16 in the paper)'),
        ('max_lr', 0 < t.max_lr <= 10, 'an inner learning-rate bound in (0, 10]'),
        ('grad_clip', t.grad_clip >= 0, 'a norm bound >= 0 (0: none)'),
        ('conv_size', t.conv_size >= 1, 'a positive kernel size (4 in the paper)'),
        ('num_heads', t.num_heads >= 0, 'a count >= 0 (0: model.num_heads)'),
        ('head_dim', t.head_dim >= 0, 'a size >= 0 (0: the attention head dim)'),
        ('objective', t.objective in OBJECTIVES, f'one of {", ".join(OBJECTIVES)} (Miras attentional bias)'),
        ('retention', t.retention in RETENTIONS, f'one of {", ".join(RETENTIONS)} (Miras retention)'),
        ('p', t.p >= 1, 'an exponent >= 1 for the lp objective (Moneta: 3)'),
        ('q', t.q >= 2, 'an exponent >= 2 for the lq retention (Moneta: 4)'),
        ('l1', t.l1 >= 0, 'a threshold >= 0 for the elastic-net retention'),
    ]
    for name, ok, allowed in checks:
      if not ok:
        raise ConfigError(f'model.titans.{name}', t[name], allowed)

  @classmethod
  def flops(cls, config, seq_len):
    """Per token and head: the keys' forward and backward through the memory (6 · weights), the read through the
    chunk-start memory and momentum (4 · weights), and the dual form's two C×C products per layer."""
    h, d = titans_dims(config)
    spec = memory_spec(config)
    weights = sum(i * o for i, o in spec.layer_shapes())
    c = min(config.model.titans.chunk_size, seq_len)
    dual = sum(2 * c * (i + o) for i, o in spec.layer_shapes())
    return float(seq_len * h * (10 * weights + dual))

  def initial_weights(self, batch: int):
    return [jnp.broadcast_to(w[...], (batch,) + w.shape) for w in self.memory]

  def features(self, x, segment_ids, conv_cache, conv_segment_ids=None):
    b, t, _ = x.shape
    h, d = self.heads, self.head_dim
    qkv, conv_cache = self.conv(self.qkv(x).reshape(b, t, 3 * h * d), segment_ids, conv_cache, conv_segment_ids)
    q, k, v = jnp.split(jax.nn.silu(qkv).reshape(b, t, 3, h, d), 3, axis=2)
    logits = self.gates(x).astype(jnp.float32) + self.gate_bias[...]                      # [B, T, 3 or 4, H]
    gates = jax.nn.sigmoid(logits[:, :, :3])
    g = {'theta': self.max_lr * gates[:, :, 0], 'eta': gates[:, :, 1], 'alpha': gates[:, :, 2],
         'delta': jax.nn.softplus(logits[:, :, 3]) if logits.shape[2] == 4 else jnp.ones_like(gates[:, :, 0])}
    return l2_normalize(q[:, :, 0]), l2_normalize(k[:, :, 0]), v[:, :, 0], g, conv_cache

  def lmm(self, q, k, v, g, state, segment_ids=None, reset_weights=None):
    return chunk_lmm(self.spec, q, k, v, g['theta'], g['eta'], g['alpha'], state, self.chunk_size,
                     segment_ids=segment_ids, reset_weights=reset_weights, delta=g['delta'])

  def __call__(self, x, *, positions, segment_ids, cache=None):
    del positions
    b = x.shape[0]
    q, k, v, g, conv_cache = self.features(x, segment_ids, None if cache is None else cache['conv'])
    if cache is None:
      state = init_state(self.spec, [w[...] for w in self.memory], b)
      mesh = current_mesh()
      if mesh is not None and mesh.shape.get('sequence', 1) > 1:
        # The memory is handed from device to device along the sharded sequence (longctx.parallel.context).
        form = lambda q, k, v, theta, eta, alpha, delta, state, fresh, ids: self.lmm(
            q, k, v, {'theta': theta, 'eta': eta, 'alpha': alpha, 'delta': delta}, state, ids, fresh['weights'])
        o = handed_recurrence(form, (q, k, v, g['theta'], g['eta'], g['alpha'], g['delta']), state, segment_ids,
                              mesh=mesh)
      else:
        o, _ = self.lmm(q, k, v, g, state, segment_ids, self.initial_weights(b))
    else:
      o, cache = self._decode(q, k, v, g, cache)
      cache = {**cache, 'conv': conv_cache}
    return self.project(o, x), cache

  def project(self, o, x):
    """The memory's reads o [B, T, H, D] to the model width: W_o (RMSNorm(o) ⊙ SiLU(W_g x))."""
    return self.o(self.o_norm(o.astype(x.dtype)) * jax.nn.silu(self.gate(x)))

  def _decode(self, q, k, v, g, cache):
    """Token by token through the chunk in progress (module docstring)."""
    c = self.chunk_size

    def one(cache, xs):
      q_t, k_t, v_t, *g_t = xs                               # [B, H, ...] / [B, H]
      n = cache['count']
      put = lambda buf, val: jax.lax.dynamic_update_index_in_dim(buf, val.astype(buf.dtype), n, axis=1)
      buf = {name: put(cache[name], val) for name, val in zip(('k', 'v') + GATES, (k_t, v_t, *g_t))}
      qs = put(jnp.zeros_like(buf['k']), q_t)
      o, state = self.lmm(qs, buf['k'], buf['v'], buf, cache['memory'])
      o_t = jax.lax.dynamic_index_in_dim(o, n, axis=1, keepdims=False)
      full = n + 1 == c
      # Slots after n are empty; they do not reach the read at n, and the memory only advances on a full chunk.
      memory = jax.tree.map(lambda new, old: jnp.where(full, new, old), state, cache['memory'])
      cleared = {name: jnp.where(full, jnp.zeros_like(b), b) for name, b in buf.items()}
      return {**cache, **cleared, 'memory': memory, 'count': jnp.where(full, 0, n + 1)}, o_t

    steps = tuple(jnp.moveaxis(a.astype(jnp.float32), 1, 0) for a in (q, k, v) + tuple(g[n] for n in GATES))
    cache, o = jax.lax.scan(one, cache, steps)
    return jnp.moveaxis(o, 0, 1), cache

  def init_cache(self, batch: int, max_len: int = 0, dtype=jnp.float32):
    del max_len
    h, d, c = self.heads, self.head_dim, self.chunk_size
    buffers = {name: jnp.zeros((batch, c, h, d), jnp.float32) for name in ('k', 'v')}
    buffers.update({name: jnp.zeros((batch, c, h), jnp.float32) for name in GATES})
    return {'conv': jnp.zeros((batch, self.conv.size - 1, 3 * h * d), dtype),
            'memory': init_state(self.spec, [w[...] for w in self.memory], batch),
            'count': jnp.zeros((), jnp.int32), **buffers}

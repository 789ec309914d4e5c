"""Titans' neural long-term memory as a sequence mixer (Behrouz, Zhong, Mirrokni 2025, "Titans: Learning to
Memorize at Test Time"): the LMM alone, `model.pattern = 'titans'`.

    q, k, v = SiLU(ShortConv(W_{q,k,v} x));  q, k ← q/‖q‖, k/‖k‖
    θ_t = max_lr · σ(W_θ x_t),  η_t = σ(W_η x_t),  α_t = σ(W_α x_t)         (per head; α optionally per channel)
    S_t = η_t S_{t−1} − θ_t ∇ℓ(M_{t−1}; k_t, v_t),  M_t = (1 − α_t) M_{t−1} + S_t,  ℓ = ‖M(k) − v‖²
    o_t = M_t(q_t);  y = W_o (RMSNorm(o) ⊙ SiLU(W_g x))

M is a per-head MLP (`model.titans.memory_depth`, expansion, activation; residual around a parameter-free
LayerNorm for depth ≥ 2) whose initial weights are learned. Training uses the chunk-parallel form
(`longctx.ops.titans.chunk_lmm`: gradients of a chunk of `model.titans.chunk_size` tokens at the memory the last
chunk left); packed documents each start from the initial memory. The forgetting gate starts near 0 (bias −4) and
the momentum gate near 0.5. Three separate fields shape the chunking: `anchor_batch` (the paper's b: tokens whose
gradients share one memory state; 0 = chunk_size), `chunk_size` (tokens per step of the sequential scan, a multiple of
the anchor batch: one state per chunk is kept for the backward pass) and `gate_granularity` (`token`: θ, η, α per
token; `chunk`: each anchor batch holds the gates of its first token — or of the first token of a document starting
inside it — the paper's faster variant, still causal). `forget_gate = channel` gives α one value per channel
(`longctx.ops.titans.memory.decay_axis`).

Decoding follows the same chunk semantics: the cache holds the memory at the last anchor-batch boundary and the
tokens of the batch in progress; each new token re-reads that partial batch (at most anchor_batch tokens) and the
memory advances when the batch fills, so cached decoding equals the full forward. The cache is
{'conv', 'memory': {'weights', 'momentum'}, 'k', 'v', 'theta', 'eta', 'alpha', 'delta' (the partial chunk), 'count'}.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from kernels_pallas.titans import supported as kernel_supported
from longctx.config import ConfigError
from longctx.layers import registry
from longctx.layers.common import Dense, RMSNorm, l2_normalize
from longctx.layers.conv import ShortConv
from longctx.ops.chunking import resets
from longctx.ops.titans import MemorySpec, chunk_lmm, init_state
from longctx.ops.titans.memory import ACTIVATIONS, OBJECTIVES, RETENTIONS, starting_weights
from longctx.parallel.context import handed_recurrence, wavefront_lanes
from longctx.parallel.rules import sequence_mesh


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
GATE_GRANULARITIES = ('token', 'chunk')
FORGET_GATES = ('head', 'channel')


def hold_per_batch(gates: dict, anchor: int, segment_ids):
  """Each gate [B, T, H, ...] replaced by its value at the start of the token's anchor batch, or at the start of its
  document if that is later (so no gate crosses a document boundary or looks ahead)."""
  b, t = gates['theta'].shape[:2]
  pos = jnp.arange(t)
  start = (pos % anchor == 0)[None] | resets(segment_ids, t, b)
  source = jax.lax.cummax(jnp.where(start, pos, 0), axis=1)                  # [B, T]
  take = lambda g: jnp.take_along_axis(g, source.reshape((b, t) + (1,) * (g.ndim - 2)), axis=1)
  return {name: take(g) for name, g in gates.items()}


@registry.register('titans')
class Titans(registry.Mixer):
  """The long-term memory module (module docstring)."""
  context_parallel = True
  natural_order = True      # under sequence sharding the memory is handed from shard to shard in token order

  @classmethod
  def check_sequence_sharding(cls, config, shards):
    registry.check_divides_shard('model.titans.chunk_size', config.model.titans.chunk_size, config, shards)

  def __init__(self, config, *, layer_index: int, rngs: nnx.Rngs):
    del layer_index
    m = config.model
    t = m.titans
    self.heads, self.head_dim = h, d = titans_dims(config)
    self.spec = memory_spec(config)
    dm = m.d_model
    self.qkv = Dense((dm,), (3, h, d), ('embed', None, 'heads', 'head_dim'), rngs=rngs)
    self.conv = ShortConv(3 * h * d, t.conv_size, ('heads',), rngs=rngs)
    # θ, η, α logits per head (and Huber's δ, through softplus, for the 'huber' objective); α per channel apart.
    self.gate_names = ('theta', 'eta') + (('alpha',) if t.forget_gate == 'head' else ()) + (
        ('delta',) if t.objective == 'huber' else ())
    self.gates = Dense((dm,), (len(self.gate_names), h), ('embed', None, 'heads'), rngs=rngs, std=0.02)
    bias = {'theta': 0.0, 'eta': 0.0, 'alpha': -4.0, 'delta': 0.0}
    self.gate_bias = nnx.Param(jnp.asarray([[bias[n]] * h for n in self.gate_names], jnp.float32),
                               logical_axes=(None, 'heads'))
    if t.forget_gate == 'channel':
      self.forget = Dense((dm,), (h, d), ('embed', 'heads', 'head_dim'), rngs=rngs, std=0.02)
      self.forget_bias = nnx.Param(jnp.full((h, d), -4.0, jnp.float32), logical_axes=('heads', 'head_dim'))
    self.memory = nnx.List([
        nnx.Param(jax.random.normal(rngs.params(), (h, i, o), jnp.float32) * i ** -0.5,
                  logical_axes=('heads', None, None)) for i, o in self.spec.layer_shapes()])
    self.gate = Dense((dm,), (h, d), ('embed', 'heads', 'head_dim'), rngs=rngs)
    self.o_norm = RMSNorm(d, eps=m.norm_eps)
    self.o = Dense((h, d), (dm,), ('heads', 'head_dim', 'embed'), rngs=rngs, std=0.02 / (2 * m.num_layers) ** 0.5)
    self.chunk_size = t.chunk_size
    self.anchor = t.anchor_batch or t.chunk_size
    self.per_chunk_gates = t.gate_granularity == 'chunk'
    self.kernel = t.kernel
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
        ('anchor_batch', t.anchor_batch >= 0 and t.chunk_size % (t.anchor_batch or t.chunk_size) == 0,
         f'0 (= chunk_size) or a divisor of model.titans.chunk_size={t.chunk_size}'),
        ('gate_granularity', t.gate_granularity in GATE_GRANULARITIES, f'one of {", ".join(GATE_GRANULARITIES)}'),
        ('forget_gate', t.forget_gate in FORGET_GATES and (t.forget_gate == 'head' or t.memory_depth <= 2),
         f'one of {", ".join(FORGET_GATES)} (channel: memory_depth 1 or 2, here {t.memory_depth})'),
        ('max_lr', 0 < t.max_lr <= 10, 'an inner learning-rate bound in (0, 10]'),
        ('grad_clip', t.grad_clip >= 0, 'a norm bound >= 0 (0: none)'),
        ('conv_size', t.conv_size >= 1, 'a positive kernel size (4 in the paper)'),
        ('num_heads', t.num_heads >= 0, 'a count >= 0 (0: model.num_heads)'),
        ('head_dim', t.head_dim >= 0, 'a size >= 0 (0: the attention head dim)'),
        ('objective', t.objective in OBJECTIVES, f'one of {", ".join(OBJECTIVES)} (Miras attentional bias)'),
        ('retention', t.retention in RETENTIONS, f'one of {", ".join(RETENTIONS)} (Miras retention; kl: Memora)'),
        ('p', t.p >= 1, 'an exponent >= 1 for the lp objective (Moneta: 3)'),
        ('q', t.q >= 2, 'an exponent >= 2 for the lq retention (Moneta: 4)'),
        ('l1', t.l1 >= 0, 'a threshold >= 0 for the elastic-net retention'),
    ]
    for name, ok, allowed in checks:
      if not ok:
        raise ConfigError(f'model.titans.{name}', t[name], allowed)
    if t.kernel in ('pallas', 'pallas_interpret'):
      ok, why = kernel_supported(memory_spec(config), t.anchor_batch or t.chunk_size, t.forget_gate == 'channel')
      if not ok:
        raise ConfigError('model.titans.kernel', t.kernel, f'auto or jax for this memory: the kernel cannot take {why}')

  @classmethod
  def flops(cls, config, seq_len):
    """Per token and head: the keys' forward and backward through the memory (6 · weights), the read through the
    batch-start memory and momentum (4 · weights), and the dual form's two C×C products per layer."""
    h, d = titans_dims(config)
    spec = memory_spec(config)
    weights = sum(i * o for i, o in spec.layer_shapes())
    t = config.model.titans
    c = min(t.anchor_batch or t.chunk_size, seq_len)
    dual = sum(2 * c * (i + o) for i, o in spec.layer_shapes())
    return float(seq_len * h * (10 * weights + dual))

  def initial_weights(self, batch: int):
    return [jnp.broadcast_to(w, (batch,) + w.shape) for w in starting_weights(self.spec, [w[...] for w in self.memory])]

  def features(self, x, segment_ids, conv_cache, conv_segment_ids=None):
    b, t, _ = x.shape
    h, d = self.heads, self.head_dim
    qkv, conv_cache = self.conv(self.qkv(x).reshape(b, t, 3 * h * d), segment_ids, conv_cache, conv_segment_ids)
    q, k, v = jnp.split(jax.nn.silu(qkv).reshape(b, t, 3, h, d), 3, axis=2)
    logits = self.gates(x).astype(jnp.float32) + self.gate_bias[...]                      # [B, T, gates, H]
    logit = {n: logits[:, :, i] for i, n in enumerate(self.gate_names)}
    if 'alpha' not in logit:
      logit['alpha'] = self.forget(x).astype(jnp.float32) + self.forget_bias[...]          # [B, T, H, D]
    g = {'theta': self.max_lr * jax.nn.sigmoid(logit['theta']), 'eta': jax.nn.sigmoid(logit['eta']),
         'alpha': jax.nn.sigmoid(logit['alpha']),
         'delta': jax.nn.softplus(logit['delta']) if 'delta' in logit else jnp.ones_like(logit['theta'])}
    return l2_normalize(q[:, :, 0]), l2_normalize(k[:, :, 0]), v[:, :, 0], g, conv_cache

  def lmm(self, q, k, v, g, state, segment_ids=None, reset_weights=None, kernel=None):
    if self.per_chunk_gates:
      g = hold_per_batch(g, self.anchor, segment_ids)
    return chunk_lmm(self.spec, q, k, v, g['theta'], g['eta'], g['alpha'], state, self.chunk_size,
                     anchor=self.anchor, segment_ids=segment_ids, reset_weights=reset_weights, delta=g['delta'],
                     kernel=kernel or self.kernel)

  def __call__(self, x, *, positions, segment_ids, cache=None):
    del positions
    b = x.shape[0]
    q, k, v, g, conv_cache = self.features(x, segment_ids, None if cache is None else cache['conv'])
    if cache is None:
      state = init_state(self.spec, [w[...] for w in self.memory], b)
      mesh = sequence_mesh()
      if mesh is not None:
        # The memory is handed from device to device along the sharded sequence (longctx.parallel.context).
        form = lambda q, k, v, theta, eta, alpha, delta, state, fresh, ids: self.lmm(
            q, k, v, {'theta': theta, 'eta': eta, 'alpha': alpha, 'delta': delta}, state, ids, fresh['weights'])
        o = handed_recurrence(form, (q, k, v, g['theta'], g['eta'], g['alpha'], g['delta']), state, segment_ids,
                              mesh=mesh, lanes=wavefront_lanes(self.heads, mesh.shape['sequence']))
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
    """Token by token through the anchor batch in progress (module docstring)."""
    c = self.anchor

    def one(cache, xs):
      q_t, k_t, v_t, *g_t = xs                               # [B, H, ...] / [B, H]
      n = cache['count']
      if self.per_chunk_gates:
        g_t = [jnp.where(n > 0, cache[name][:, 0], val) for name, val in zip(GATES, g_t)]
      put = lambda buf, val: jax.lax.dynamic_update_index_in_dim(buf, val.astype(buf.dtype), n, axis=1)
      buf = {name: put(cache[name], val) for name, val in zip(('k', 'v') + GATES, (k_t, v_t, *g_t))}
      qs = put(jnp.zeros_like(buf['k']), q_t)
      o, state = self.lmm(qs, buf['k'], buf['v'], buf, cache['memory'], kernel='jax')
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
    h, d, c = self.heads, self.head_dim, self.anchor
    with_channels = ('k', 'v') + (() if 'alpha' in self.gate_names else ('alpha',))
    buffers = {name: jnp.zeros((batch, c, h) + ((d,) if name in with_channels else ()), jnp.float32)
               for name in ('k', 'v') + GATES}
    return {'conv': jnp.zeros((batch, self.conv.size - 1, 3 * h * d), dtype),
            'memory': init_state(self.spec, [w[...] for w in self.memory], batch),
            'count': jnp.zeros((), jnp.int32), **buffers}

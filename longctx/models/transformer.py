"""The language model: token embedding -> blocks (one mixer each, per the resolved pattern) -> RMSNorm -> logits.

Each block is pre-norm:  x += mixer(RMSNorm(x));  x += SwiGLU(RMSNorm(x)).  Logits are fp32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from longctx.layers import registry
from longctx.layers.common import RMSNorm, SwiGLU, param
from longctx.ops import cross_entropy
from longctx.models import scan
from longctx.models.pattern import resolve
from longctx.parallel.rules import constrain

REMAT_POLICIES = {
    'full': None,
    'dots_saveable': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # The same matmul outputs, kept in pinned host memory between the forward and the backward pass.
    'offload_dots': jax.checkpoint_policies.offload_dot_with_no_batch_dims('device', 'pinned_host'),
}


class Block(nnx.Module):

  def __init__(self, config, mixer: str, layer_index: int, *, rngs: nnx.Rngs):
    m = config.model
    self.mixer_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.mixer = registry.get(mixer)(config, layer_index=layer_index, rngs=rngs)
    self.mlp_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.mlp = SwiGLU(m.d_model, m.mlp_dim, rngs=rngs, out_std=0.02 / (2 * m.num_layers) ** 0.5)

  def __call__(self, x, positions, segment_ids, log_lower_bound=None):
    return self.decode(x, positions, segment_ids, None, log_lower_bound)[0]

  def decode(self, x, positions, segment_ids, cache, log_lower_bound=None):
    extra = {} if log_lower_bound is None else {'log_lower_bound': log_lower_bound}
    y, cache = self.mixer(self.mixer_norm(x), positions=positions, segment_ids=segment_ids, cache=cache, **extra)
    x = constrain(x + y, ('batch', 'length', 'act_embed'))
    x = x + self.mlp(self.mlp_norm(x))
    return constrain(x, ('batch', 'length', 'act_embed')), cache


class LanguageModel(nnx.Module):
  """Decoder-only LM. `__call__(tokens, positions, segment_ids) -> fp32 logits [B, T, vocab]`;
  `token_loss(tokens, positions, segment_ids, targets) -> (nll, logz)` [B, T] without returning the logits."""

  def __init__(self, config, *, rngs: nnx.Rngs):
    m = config.model
    self.layer_names = tuple(resolve(m.pattern, m.num_layers, m.get('hybrid')))
    self.embed = param(rngs, (m.vocab_size, m.d_model), ('vocab', 'embed'), std=1.0)
    self.blocks = nnx.List(scan.build(lambda i, rngs: Block(config, self.layer_names[i], i, rngs=rngs),
                                      len(self.layer_names), rngs))
    # Forget-gate lower bounds (HGRN, HGRN2): per mixer kind, one row of logits per layer of that kind.
    groups = {}
    for i, name in enumerate(self.layer_names):
      if registry.get(name).depth_lower_bound:
        groups.setdefault(name, []).append(i)
    self.bound_groups = tuple((name, tuple(layers)) for name, layers in groups.items())
    for name, layers in self.bound_groups:
      shape = (len(layers),) + tuple(registry.get(name).lower_bound_shape(config))
      setattr(self, f'lower_bounds_{name}',
              nnx.Param(jnp.zeros(shape, jnp.float32), logical_axes=('layers',) + (None,) * (len(shape) - 1)))
    self.final_norm = RMSNorm(m.d_model, eps=m.norm_eps)
    self.tie_embeddings = m.tie_embeddings
    if not m.tie_embeddings:
      self.head = param(rngs, (m.d_model, m.vocab_size), ('embed', 'vocab'), std=m.d_model ** -0.5)
    self.remat = m.remat
    self.scan_layers = m.get('scan_layers', False)
    self.loss_chunks = m.get('loss_chunks', 1)
    self.compute_dtype = jnp.dtype(m.dtype)

  def lower_bounds(self):
    """Per layer: the log of its forget-gate lower bound, or None (no bound). The bound is a softmax over the layers
    of one kind, summed cumulatively, minus the first: 0 in the first such layer (None: no parameter reaches it),
    rising with depth, below 1. Taken in log space (log-sum-exp of log-softmax rows), so neither the bound nor its
    gradient passes through a log of something that may round to 0."""
    bounds = [None] * len(self.blocks)
    for name, layers in self.bound_groups:
      log_p = jax.nn.log_softmax(getattr(self, f'lower_bounds_{name}')[...], axis=0)
      for row, i in enumerate(layers[1:], start=1):
        bounds[i] = jax.nn.logsumexp(log_p[1:row + 1], axis=0)
    return bounds

  def seed_routing(self, tokens, positions, segment_ids, seed: int, iterations: int):
    """Sets every routing layer's centroids by `iterations` k-means steps over its own routed vectors of this batch,
    layer after layer (each later layer sees the earlier ones already seeded)."""
    routed = [block.mixer for block in self.blocks if getattr(block.mixer, 'routed', 0)]
    for mixer in routed:
      mixer.seeding = (seed, iterations)
    try:
      self.hidden(tokens, positions, segment_ids)
    finally:
      for mixer in routed:
        mixer.seeding = None

  def layer_plan(self) -> scan.Plan:
    """Which layers `model.scan_layers` runs as one scan (none without it): repeats of blocks with the same graph,
    parameter shapes and kind of forget-gate bound (HGRN's first layer of a kind has none)."""
    if not self.scan_layers:
      return scan.UNROLLED
    bounded = {i for _, layers in self.bound_groups for i in layers[1:]}
    return scan.plan([scan.block_key(block) + (i in bounded,) for i, block in enumerate(self.blocks)])

  def hidden(self, tokens, positions, segment_ids):
    """Final-norm hidden states [B, T, d] in the compute dtype."""
    x = jnp.take(self.embed[...].astype(self.compute_dtype), tokens, axis=0)
    x = constrain(x, ('batch', 'length', 'act_embed'))
    apply = lambda block, x, bound: block(x, positions, segment_ids, bound)
    x = scan.run(self.blocks, self.lower_bounds(), x, self.layer_plan(), apply, remat=self.remat != 'none',
                 policy=REMAT_POLICIES.get(self.remat))
    return self.final_norm(x)

  def head_weights(self, dtype):
    if self.tie_embeddings:
      # Tied head: scaled by 1/√d so that logits start at unit variance with the unit-variance embedding.
      return self.embed[...].astype(dtype).T * (self.embed.shape[-1] ** -0.5)
    return self.head[...].astype(dtype)

  def __call__(self, tokens, positions, segment_ids):
    x = self.hidden(tokens, positions, segment_ids)
    logits = jnp.einsum('btd,dv->btv', x, self.head_weights(x.dtype), preferred_element_type=jnp.float32)
    return constrain(logits, ('batch', 'length', 'act_vocab'))

  def init_cache(self, batch: int, max_len: int):
    """One cache per layer, for `decode`."""
    return [block.mixer.init_cache(batch, max_len, self.compute_dtype) for block in self.blocks]

  def decode(self, tokens, positions, caches):
    """Continue one document per row: logits [B, T, vocab] of the new tokens and the updated caches.

    Prefill is a call with the prompt; generation calls with one token at a time."""
    x = jnp.take(self.embed[...].astype(self.compute_dtype), tokens, axis=0)
    new_caches = []
    for block, cache, bound in zip(self.blocks, caches, self.lower_bounds()):
      x, cache = block.decode(x, positions, None, cache, bound)
      new_caches.append(cache)
    x = self.final_norm(x)
    logits = jnp.einsum('btd,dv->btv', x, self.head_weights(x.dtype), preferred_element_type=jnp.float32)
    return logits, new_caches

  def token_loss(self, tokens, positions, segment_ids, targets):
    x = self.hidden(tokens, positions, segment_ids)
    if self.loss_chunks > 1:
      return cross_entropy.chunked(x, self.head_weights(x.dtype), targets, self.loss_chunks)
    return cross_entropy.fused(x, self.head_weights(x.dtype), targets)

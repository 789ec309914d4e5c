"""optax optimizer and learning-rate schedule from `config.train`."""
from __future__ import annotations

import jax
import optax


def schedule(t) -> optax.Schedule:
  """Linear warmup from 0 to the peak, then cosine / linear decay to peak·min_lr_ratio, or constant."""
  peak, warm, total = t.learning_rate, t.warmup_steps, t.num_steps
  end = peak * t.min_lr_ratio
  if t.schedule == 'cosine':
    return optax.warmup_cosine_decay_schedule(0.0, peak, warm, max(total, warm + 1), end)
  warmup = optax.linear_schedule(0.0, peak, max(warm, 1))
  if t.schedule == 'linear':
    after = optax.linear_schedule(peak, end, max(total - warm, 1))
  else:
    after = optax.constant_schedule(peak)
  return optax.join_schedules([warmup, after], [warm])


def decay_mask(params, decay_embeddings: bool):
  """Weight decay on matrices; never on norm scales or biases; on the embedding table only if asked."""
  def decide(path, leaf):
    is_embedding = any(getattr(k, 'key', None) == 'embed' for k in path[:1])
    return leaf.ndim >= 2 and (decay_embeddings or not is_embedding)
  return jax.tree_util.tree_map_with_path(decide, params)


def make(t, params) -> optax.GradientTransformation:
  lr = schedule(t)
  mask = decay_mask(params, t.decay_embeddings)
  if t.optimizer == 'adamw':
    core = optax.adamw(lr, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay, mask=mask)
  elif t.optimizer == 'adam':
    core = optax.adam(lr, b1=t.b1, b2=t.b2, eps=t.eps)
  elif t.optimizer == 'lion':
    core = optax.lion(lr, b1=t.b1, b2=t.b2, weight_decay=t.weight_decay, mask=mask)
  else:
    core = optax.chain(optax.add_decayed_weights(t.weight_decay, mask), optax.sgd(lr, momentum=t.b1))
  return optax.chain(optax.clip_by_global_norm(t.clip_norm), core) if t.clip_norm > 0 else core

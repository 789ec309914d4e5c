"""Loss, the jitted train step (gradient accumulation, clipping, non-finite guard) and the evaluation step."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from longctx.parallel import mesh as mesh_lib
from longctx.parallel.rules import activation_sharding


def targets_and_weights(batch):
  """Next-token targets; a position counts only if its next token is in the same (non-padding) document."""
  tokens, seg = batch['tokens'], batch['segment_ids']
  targets = jnp.roll(tokens, -1, axis=1)
  same_doc = (seg == jnp.roll(seg, -1, axis=1)) & (seg > 0)
  weights = same_doc.at[:, -1].set(False).astype(jnp.float32)
  if 'loss_mask' in batch:
    weights = weights * jnp.roll(batch['loss_mask'], -1, axis=1).astype(jnp.float32)
  return targets, weights


def token_nll(setup, params, batch):
  """Per-token negative log-likelihood (fp32) and log-partition, [B, T] each."""
  model = setup.model(params)
  segment_ids = batch['segment_ids'] if setup.uses_segments else None
  targets, _ = targets_and_weights(batch)
  return model.token_loss(batch['tokens'], batch['positions'], segment_ids, targets)


def _loss_sums(setup, params, batch):
  """(objective summed over tokens, (nll sum, token count)); summed so that accumulation is exact."""
  nll, logz = token_nll(setup, params, batch)
  _, w = targets_and_weights(batch)
  nll_sum = jnp.sum(nll * w)
  objective = nll_sum + setup.config.train.z_loss * jnp.sum(jnp.square(logz) * w)
  return objective, (nll_sum, jnp.sum(w))


def make_train_step(setup):
  cfg = setup.config.train
  accum = cfg.grad_accum
  grad_fn = jax.grad(lambda p, b: _loss_sums(setup, p, b), has_aux=True)

  def step(state, batch):
    params = state['params']
    with activation_sharding(setup.mesh):
      if accum == 1:
        grads, (nll, count) = grad_fn(params, batch)
      else:
        micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

        def body(carry, mb):
          g, n, c = carry
          dg, (dn, dc) = grad_fn(params, mb)
          return (jax.tree.map(jnp.add, g, dg), n + dn, c + dc), None

        zeros = jax.tree.map(jnp.zeros_like, params)
        (grads, nll, count), _ = jax.lax.scan(body, (zeros, 0.0, 0.0), micro)
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    loss = nll / denom
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = setup.tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    # A non-finite step changes nothing but the step counter; the host halts or skips per train.nan_policy.
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = {'step': state['step'] + 1, 'params': keep(new_params, params),
                 'opt_state': keep(opt_state, state['opt_state']), 'rng': state['rng']}
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'param_norm': optax.tree.norm(new_state['params']),
               'learning_rate': setup.schedule(state['step']), 'tokens': count, 'finite': finite}
    return new_state, metrics

  rep = mesh_lib.replicated(setup.mesh)
  data = mesh_lib.batch_sharding(setup.mesh)
  return jax.jit(step, in_shardings=(setup.shardings, data), out_shardings=(setup.shardings, rep),
                 donate_argnums=(0,))


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
  """[lo, hi) ranges of in-document position: 0, 1, 2-3, 4-7, ... up to seq_len."""
  edges = [0] + [2 ** i for i in range(math.ceil(math.log2(max(seq_len, 2))) + 1)]
  edges = sorted(set(min(e, seq_len) for e in edges))
  return list(zip(edges[:-1], edges[1:]))


def make_eval_step(setup):
  """(params, batch) -> (nll sum, correct next-token predictions, token count), each [num_buckets]."""
  buckets = position_buckets(setup.config.data.seq_len)
  lo = jnp.array([b[0] for b in buckets])
  hi = jnp.array([b[1] for b in buckets])

  def step(params, batch):
    targets, w = targets_and_weights(batch)
    with activation_sharding(setup.mesh):
      segment_ids = batch['segment_ids'] if setup.uses_segments else None
      logits = setup.model(params)(batch['tokens'], batch['positions'], segment_ids)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    pos = batch['positions'][..., None]
    member = ((pos >= lo) & (pos < hi)).astype(jnp.float32) * w[..., None]     # B, T, buckets
    return (jnp.einsum('btk,bt->k', member, nll), jnp.einsum('btk,bt->k', member, correct),
            jnp.sum(member, axis=(0, 1)))

  rep = mesh_lib.replicated(setup.mesh)
  data = mesh_lib.batch_sharding(setup.mesh)
  return jax.jit(step, in_shardings=(setup.shardings['params'], data), out_shardings=(rep, rep, rep)), buckets

"""Loss, the jitted train step (gradient accumulation, clipping, non-finite guard) and the evaluation step."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from longctx.data import next_token_targets
from longctx.layers import routing
from longctx.parallel import mesh as mesh_lib
from longctx.parallel.rules import activation_sharding


def targets_and_weights(batch):
  """Next-token targets; a position counts only if its next token is in the same (non-padding) document. A batch
  whose tokens the loader reordered (context parallelism) brings its own, taken in the original order."""
  if 'targets' in batch:
    return batch['targets'], batch['target_weights'].astype(jnp.float32)
  return next_token_targets(batch, jnp)


def _loss_sums(setup, params, batch, buffers=None):
  """(objective summed over tokens, (nll sum, token count, routing stats)); summed so that accumulation is exact.
  The objective adds model.routing.commitment × the routing layers' commitment sums."""
  model = setup.model(params, buffers)
  segment_ids = batch['segment_ids'] if setup.uses_segments else None
  targets, w = targets_and_weights(batch)
  nll, logz = model.token_loss(batch['tokens'], batch['positions'], segment_ids, targets)
  nll_sum = jnp.sum(nll * w)
  objective = nll_sum + setup.config.train.z_loss * jnp.sum(jnp.square(logz) * w)
  stats = nnx.to_pure_dict(nnx.state(model, routing.RoutingStats))
  if setup.has_buffers:
    objective = objective + setup.config.model.routing.commitment * routing.commitment_total(buffers, stats)
  return objective, (nll_sum, jnp.sum(w), stats)


def mean_gradients(setup, params, batch, buffers=None):
  """(gradients of the mean objective per counted token, (mean loss, token count, routing stats)); with
  train.grad_accum > 1 the micro-batches' sums are added before dividing, so accumulation is exact."""
  accum = setup.config.train.grad_accum
  grad_fn = jax.grad(lambda p, b, buf: _loss_sums(setup, p, b, buf), has_aux=True)
  with activation_sharding(setup.mesh):
    if accum == 1:
      grads, (nll, count, stats) = grad_fn(params, batch, buffers)
    else:
      micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

      def body(carry, mb):
        g, n, c, st = carry
        dg, (dn, dc, dst) = grad_fn(params, mb, buffers)
        return (jax.tree.map(jnp.add, g, dg), n + dn, c + dc, jax.tree.map(jnp.add, st, dst)), None

      zeros = jax.tree.map(jnp.zeros_like, params)
      (grads, nll, count, stats), _ = jax.lax.scan(body, (zeros, 0.0, 0.0, setup.zero_stats()), micro)
  denom = jnp.maximum(count, 1.0)
  return jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads), (nll / denom, count, stats)


class TrainStep:
  """The jitted step: (state, batch[, healthy]) -> (state, metrics). A step whose loss or gradients are not finite
  changes nothing but the step counter, and so does every step after it while `healthy` is passed back from the
  previous step's metrics (train.nan_policy = halt: the host sees the failure some steps later, and the state is
  still the one the failed step started from). Its lowered and compiled forms (`lower`, then `compile`) are
  TrainSteps too, called the same way, with the rest of jax's stage (as_text, memory_analysis, ...) passed through."""

  def __init__(self, stage):
    self.stage = stage

  def __call__(self, state, batch, healthy=True):
    return self.stage(state, batch, healthy)

  def lower(self, state, batch):
    return TrainStep(self.stage.lower(state, batch, True))

  def compile(self):
    return TrainStep(self.stage.compile())

  def __getattr__(self, name):
    return getattr(self.stage, name)


def make_train_step(setup) -> TrainStep:
  routing_cfg = setup.config.model.routing

  def step(state, batch, healthy):
    params, buffers = state['params'], state.get('buffers')
    grads, (loss, count, stats) = mean_gradients(setup, params, batch, buffers)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    apply = finite & healthy
    updates, opt_state = setup.tx.update(grads, state['opt_state'], params)
    new_params = optax.apply_updates(params, updates)
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
    new_state = {'step': state['step'] + 1, 'params': keep(new_params, params),
                 'opt_state': keep(opt_state, state['opt_state']), 'rng': state['rng']}
    if setup.has_buffers:
      # Centroids follow the vectors assigned to them over the whole global batch (under the mesh, the sums in
      # `stats` already cover every data-parallel replica), outside the optimizer.
      moved = routing.update_centroids(buffers, stats, routing_cfg.ema_decay, routing_cfg.ema_eps)
      new_state['buffers'] = keep(moved, buffers)
    metrics = {'loss': loss, 'grad_norm': grad_norm, 'param_norm': optax.tree.norm(new_state['params']),
               'learning_rate': setup.schedule(state['step']), 'tokens': count, 'finite': finite,
               'healthy': apply}
    return new_state, metrics

  rep = mesh_lib.replicated(setup.mesh)
  data = mesh_lib.batch_sharding(setup.mesh)
  return TrainStep(jax.jit(step, in_shardings=(setup.shardings, data, rep), out_shardings=(setup.shardings, rep),
                           donate_argnums=(0,)))


def position_buckets(seq_len: int) -> list[tuple[int, int]]:
  """[lo, hi) ranges of in-document position: 0, 1, 2-3, 4-7, ... up to seq_len."""
  edges = [0] + [2 ** i for i in range(math.ceil(math.log2(max(seq_len, 2))) + 1)]
  edges = sorted(set(min(e, seq_len) for e in edges))
  return list(zip(edges[:-1], edges[1:]))


def make_eval_step(setup):
  """(weights {'params', 'buffers'}, batch) -> (nll sum, correct next-token predictions, token count), each
  [num_buckets]."""
  buckets = position_buckets(setup.config.data.seq_len)
  lo = jnp.array([b[0] for b in buckets])
  hi = jnp.array([b[1] for b in buckets])

  def step(weights, batch):
    targets, w = targets_and_weights(batch)
    with activation_sharding(setup.mesh):
      segment_ids = batch['segment_ids'] if setup.uses_segments else None
      logits = setup.model(weights['params'], weights['buffers'])(batch['tokens'], batch['positions'], segment_ids)
    nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    pos = batch['positions'][..., None]
    member = ((pos >= lo) & (pos < hi)).astype(jnp.float32) * w[..., None]     # B, T, buckets
    return (jnp.einsum('btk,bt->k', member, nll), jnp.einsum('btk,bt->k', member, correct),
            jnp.sum(member, axis=(0, 1)))

  rep = mesh_lib.replicated(setup.mesh)
  data = mesh_lib.batch_sharding(setup.mesh)
  return jax.jit(step, in_shardings=(setup.weight_shardings, data), out_shardings=(rep, rep, rep)), buckets

"""What a run stopped by a non-finite step (train.nan_policy = halt) leaves behind to reproduce it.

WORKDIR/halt/ holds the state the failed step started from (an orbax checkpoint at the step before it), the
step's batch (batch.npz) and report.json: the loss, the gradient norm and every parameter whose gradient is not
finite on that batch. `replay(config, workdir)` recomputes the report from what was saved, on whatever machine and
with whatever flags it runs under (another backend, another XLA flag, a fixed op), which is how such a failure is
bisected without retraining to it.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from longctx.train import checkpoint as ckpt_lib
from longctx.train.step import mean_gradients


def directory(workdir: str) -> str:
  return os.path.join(workdir, 'halt')


def gradient_report(setup, state, batch) -> dict:
  """Loss, gradient norm and the parameters whose gradients are not finite, for one batch at one state. Each
  gradient is reduced on its devices (a norm and a count of non-finite entries), so sharded runs report too."""

  def summarize(params, batch, buffers):
    grads, (loss, count, _) = mean_gradients(setup, params, batch, buffers)
    per_leaf = lambda g: (jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))), jnp.sum(~jnp.isfinite(g)))
    return jax.tree.map(per_leaf, grads), loss, count

  summary, loss, count = jax.device_get(jax.jit(summarize)(state['params'], batch, state.get('buffers')))
  bad, norms = [], {}
  pairs = jax.tree.leaves(summary, is_leaf=lambda x: isinstance(x, tuple))
  for (path, leaf), (norm, non_finite) in zip(jax.tree_util.tree_leaves_with_path(state['params']), pairs):
    name = jax.tree_util.keystr(path)
    if non_finite:
      bad.append(f'{name} ({int(non_finite)} of {leaf.size})')
    norms[name] = float(norm)
  total = float(np.sqrt(sum(v * v for v in norms.values())))
  return {'loss': float(loss), 'tokens': float(count), 'grad_norm': total, 'non_finite_gradients': bad,
          'gradient_norms': norms, 'backend': jax.default_backend()}


def save(setup, state, batch, step: int, workdir: str, config: dict) -> dict:
  """Saves the state before `step`, its batch and the gradient report; returns the report."""
  report = {'step': step, **gradient_report(setup, state, batch)}
  path = directory(workdir)
  manager = ckpt_lib.Checkpoints(path, keep=1, async_save=False)
  # The steps queued after the failed one moved only the counter (keeping its placement on the devices).
  before = {**state, 'step': state['step'] - (int(state['step']) - (step - 1))}
  manager.save(step - 1, before, config=config)
  manager.close()
  # Every process takes part in gathering a batch sharded over processes; the first one writes it.
  arrays = {k: np.asarray(multihost_utils.process_allgather(v, tiled=True) if not v.is_fully_addressable
                          else jax.device_get(v)) for k, v in batch.items()}
  if jax.process_index() == 0:
    np.savez(os.path.join(path, 'batch.npz'), **arrays)
    with open(os.path.join(path, 'report.json'), 'w') as f:
      json.dump(report, f, indent=1)
  logging.info('halted at step %d: state, batch and gradient report in %s', step, path)
  return report


def replay(config, workdir: str, mesh=None) -> dict:
  """The gradient report of the saved halt, recomputed here."""
  from longctx.parallel import mesh as mesh_lib
  from longctx.train.state import TrainSetup
  path = directory(workdir)
  if not os.path.exists(os.path.join(path, 'batch.npz')):
    raise FileNotFoundError(f'{path}/batch.npz: no halted step saved in this workdir')
  setup = TrainSetup(config, mesh or mesh_lib.make_mesh(config.parallel))
  manager = ckpt_lib.Checkpoints(path, keep=1, async_save=False)
  state, step = manager.restore_latest(setup.abstract_state)
  manager.close()
  with np.load(os.path.join(path, 'batch.npz')) as f:
    batch = {k: jax.device_put(jnp.asarray(f[k]), mesh_lib.batch_sharding(setup.mesh)) for k in f.files}
  return {'step': step + 1, **gradient_report(setup, state, batch)}

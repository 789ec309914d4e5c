"""Orbax checkpoints of a run: the train state, the data iterator's position and the resolved config, per step.

Saves are asynchronous; the newest `train.keep` steps are kept, plus every `train.keep_every`-th. A step that
cannot be read back (a truncated file, a crash mid-write that left a finalised but damaged directory) is moved
aside as `corrupt-STEP-TIME`, never deleted, and the previous step is restored instead.
"""
from __future__ import annotations

import os
import time

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging


class IncompatibleCheckpoint(ValueError):
  """A readable checkpoint whose state tree differs from what this config builds (an optimizer change, say)."""

  def __init__(self, step, directory, saved, wanted):
    only_saved = sorted(set(saved) - set(wanted))[:3]
    only_wanted = sorted(set(wanted) - set(saved))[:3]
    reshaped = sorted(k for k in set(saved) & set(wanted) if saved[k] != wanted[k])[:3]
    super().__init__(
        f'checkpoint step {step} in {directory} does not fit this config: saved only {only_saved}, '
        f'config only {only_wanted}, shapes differ at {reshaped}. Optimizer settings that change the optimizer '
        'state (train.optimizer, train.clip_norm on/off) cannot change on resume; use a new --workdir with '
        '--config.init_from to start from its parameters.')


def _layout(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """{path: shape} with keys of every kind (dict, index, attribute) spelled as strings, as orbax spells them."""
  def name(k):
    for attr in ('key', 'idx', 'name'):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


class Checkpoints:

  def __init__(self, directory: str, *, keep: int = 3, keep_every: int = 0, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                           enable_async_checkpointing=async_save, create=True)
    handlers = {'state': ocp.StandardCheckpointHandler(), 'data': grain.checkpoint.CheckpointHandler(),
                'config': ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None, config: dict | None = None) -> None:
    items = {'state': ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items['data'] = grain.checkpoint.CheckpointSave(data_iterator)
    if config is not None:
      items['config'] = ocp.args.JsonSave(config)
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def restore_latest(self, abstract_state, data_iterator=None):
    """(state, step) from the newest readable step, or (None, None) when there is none."""
    wanted = _layout(abstract_state)
    for step in reversed(self.steps()):
      try:
        saved = _layout(self._manager.item_metadata(step)['state'])
      except Exception as e:  # unreadable metadata: a damaged step
        self._set_aside(step, e)
        continue
      if saved != wanted:
        raise IncompatibleCheckpoint(step, self.directory, saved, wanted)
      items = {'state': ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # orbax raises many types for damaged files; any of them means "not this step"
        self._set_aside(step, e)
        continue
      return restored['state'], step
    return None, None

  def _set_aside(self, step: int, error: Exception) -> None:
    target = os.path.join(self.directory, f'corrupt-{step}-{int(time.time())}')
    logging.warning('checkpoint step %d is unreadable (%s: %s); moved to %s, trying the previous step',
                    step, type(error).__name__, str(error).splitlines()[0][:200], target)
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), target)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def reached_preemption(self, step: int) -> bool:
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_weights(directory: str, abstract_weights: dict) -> dict:
  """{'params', 'buffers'} of the newest readable step of a run (for `init_from`, evaluation, sampling), placed in
  the shardings of `abstract_weights` (`TrainSetup.abstract_weights()`); buffers {} for a model without any."""
  manager = ocp.CheckpointManager(os.path.abspath(directory))
  steps = sorted(manager.all_steps(), reverse=True)
  if not steps:
    raise FileNotFoundError(f'init_from: no checkpoint under {directory}')
  target = {k: v for k, v in abstract_weights.items() if jax.tree.leaves(v)}
  for step in steps:
    try:
      restored = manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.PyTreeRestore(target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                                       partial_restore=True)))
      logging.info('parameters of step %d of %s', step, directory)
      return {'params': restored['state']['params'], 'buffers': restored['state'].get('buffers', {})}
    except Exception as e:  # see restore_latest
      logging.warning('init_from: step %d of %s is unreadable (%s)', step, directory, e)
  raise FileNotFoundError(f'init_from: no readable checkpoint under {directory}')

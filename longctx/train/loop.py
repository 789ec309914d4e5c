"""The training loop: build or resume the state, step, log, evaluate, checkpoint, stop cleanly on preemption."""
from __future__ import annotations

import json
import os
import signal
import time

import jax
import numpy as np
from absl import logging

from longctx import config as config_lib
from longctx import data
from longctx.eval import perplexity
from longctx.parallel import distributed
from longctx.parallel import mesh as mesh_lib
from longctx.train import checkpoint as ckpt_lib
from longctx.train import flops as flops_lib
from longctx.train import halt as halt_lib
from longctx.train import metrics as metrics_lib
from longctx.train.state import TrainSetup
from longctx.train.step import make_eval_step, make_train_step


IncompatibleCheckpoint = ckpt_lib.IncompatibleCheckpoint


class TrainingHalted(RuntimeError):
  """Loss or gradients stopped being finite (train.nan_policy = halt) at `step`."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def check_resume(config, workdir: str) -> None:
  """Refuses to resume a workdir with a config whose architecture differs from the one it was started with."""
  path = os.path.join(workdir, 'config.json')
  checkpoints = os.path.join(workdir, 'checkpoints')
  saved_steps = [n for n in os.listdir(checkpoints) if n.isdigit()] if os.path.isdir(checkpoints) else []
  if not os.path.exists(path) or not saved_steps:
    return
  with open(path) as f:
    saved = json.load(f)
  changes = config_lib.architecture_changes(saved, config)
  if changes:
    key, old, new = changes[0]
    raise config_lib.ConfigError(
        key, new, f'{old!r}, the value {workdir} was trained with: a resume cannot change the architecture '
        f'({len(changes)} field(s) differ); use a new --workdir, or --config.init_from={workdir} to fine-tune')


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits 0."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: leave signals to the caller
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _profile_range(spec: str):
  if not spec:
    return None
  first, _, last = spec.partition(',')
  return int(first), int(last or first)


class _Interval:
  """Device metrics of the steps since the last row, reduced on the host into one metric row."""

  def __init__(self, nan_policy: str, tokens_per_step: int, step_flops: float, peak_flops: float | None,
               byte_level: bool):
    self.nan_policy, self.tokens_per_step, self.byte_level = nan_policy, tokens_per_step, byte_level
    self.step_flops, self.peak_flops = step_flops, peak_flops
    self.pending = []
    self.timer = time.perf_counter()
    self.untimed = 0
    self.skipped = 0

  def add(self, step, metrics):
    self.pending.append((step, metrics))

  def restart_clock(self):
    """Steps so far stay in the averages but out of the timing (the first one includes compilation)."""
    self.timer, self.untimed = time.perf_counter(), len(self.pending)

  def row(self) -> dict:
    """The metric row of the pending steps; raises TrainingHalted on a non-finite step under nan_policy=halt."""
    rows = [(s, jax.device_get(m)) for s, m in self.pending]
    timed = len(rows) - self.untimed
    elapsed = time.perf_counter() - self.timer
    self.pending, self.timer, self.untimed = [], time.perf_counter(), 0
    for step, m in rows:
      if not m['finite']:
        if self.nan_policy == 'halt':
          raise TrainingHalted(f'loss or gradients not finite at step {step} (loss={float(m["loss"])}, '
                               f'grad_norm={float(m["grad_norm"])}); the state after step {step - 1} stands (the '
                               'steps after it changed nothing) and no checkpoint was written after it. Set '
                               'train.nan_policy=skip to step over such batches.', step)
        self.skipped += 1
        logging.warning('step %d: loss or gradients not finite; update skipped', step)
    finite = [m for _, m in rows if m['finite']] or [m for _, m in rows]
    last = rows[-1][1]
    out = {**metrics_lib.loss_metrics(float(np.mean([m['loss'] for m in finite])), self.byte_level),
           'learning_rate': float(last['learning_rate']), 'grad_norm': float(last['grad_norm']),
           'param_norm': float(last['param_norm']), 'skipped_steps': self.skipped}
    if timed:
      out['step_time'] = elapsed / timed
      out['tokens_per_s'] = self.tokens_per_step / out['step_time']
      if self.peak_flops:
        out['mfu'] = self.step_flops / out['step_time'] / (self.peak_flops * jax.device_count())
    memory = metrics_lib.peak_memory_bytes()
    if memory is not None:
      out['peak_memory_gib'] = memory / 2 ** 30
    return out


def check_replication(setup, config) -> None:
  """With fsdp or tensor parallelism, logs what stays whole on every device and refuses a layout that leaves more
  than `parallel.max_replicated` of the parameter bytes so (dimensions the mesh axes do not divide)."""
  if setup.mesh.shape['fsdp'] * setup.mesh.shape['tensor'] == 1:
    return
  report = mesh_lib.replication(setup.abstract_params, setup.param_shardings, setup.mesh)
  logging.info('replicated parameters: %.1f%% of %.1f MiB; largest: %s', 100 * report['fraction'],
               report['total_bytes'] / 2 ** 20, ', '.join(f'{p} {m:.2f} MiB' for p, m in report['largest']))
  limit = config.parallel.get('max_replicated', 1.0)
  if report['fraction'] > limit:
    raise config_lib.ConfigError(
        'parallel.max_replicated', limit,
        f'at least {report["fraction"]:.3f}: {100 * report["fraction"]:.1f}% of the parameter bytes are whole on '
        f'every device under mesh {dict(setup.mesh.shape)} (largest: {report["largest"][:3]}); choose sizes that '
        'the fsdp/tensor axes divide, or raise the tolerance')


def train(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint; returns the last metric row."""
  os.makedirs(workdir, exist_ok=True)
  check_resume(config, workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_lib.to_json(config))

  t = config.train
  mesh = mesh_lib.make_mesh(config.parallel)
  setup = TrainSetup(config, mesh)
  logging.info('layers: %s', list(setup.layer_names))
  logging.info('parameters: %d; mesh: %s', setup.param_count(), dict(mesh.shape))
  check_replication(setup, config)

  distributed.barrier('setup')
  checkpoints = ckpt_lib.Checkpoints(os.path.join(workdir, 'checkpoints'), keep=t.keep, keep_every=t.keep_every)
  data_iter = iter(data.dataset(config, 'train', process_index=jax.process_index(),
                                process_count=jax.process_count()))
  state, start = checkpoints.restore_latest(setup.abstract_state, data_iter)
  if state is None:
    state, start = setup.init(config.seed), 0
    if config.init_from:
      weights = ckpt_lib.restore_weights(os.path.join(config.init_from, 'checkpoints'), setup.abstract_weights())
      state['params'] = weights['params']
      if setup.has_buffers:
        state['buffers'] = weights['buffers']
  else:
    logging.info('resumed from step %d', start)
    if start >= t.num_steps:
      logging.warning('the checkpoint in %s is at step %d, at or past train.num_steps=%d: nothing left to train',
                      workdir, start, t.num_steps)
  saved_config = {'config': config.to_dict(), 'layers': list(setup.layer_names)}

  train_step = make_train_step(setup)
  eval_step, buckets = make_eval_step(setup)
  batch_sharding = mesh_lib.batch_sharding(mesh)
  byte_level = data.is_byte_level(config)
  val_batches = None
  profile = _profile_range(t.profile_steps)
  stop_at = start + t.stop_after if t.stop_after else None

  writer = metrics_lib.MetricWriter(workdir)
  bar = metrics_lib.progress_bar(t.num_steps, start, t.progress_bar)
  interval = _Interval(t.nan_policy, t.batch_size * config.data.seq_len, flops_lib.train_flops_per_step(setup),
                       flops_lib.peak_flops(), byte_level)
  row: dict = {}
  step = start
  healthy = True
  unseen = {}   # step -> batch, for the steps whose metrics the host has not read yet
  try:
    with _Preemption() as preemption:
      while step < t.num_steps:
        if profile and step == profile[0]:
          jax.profiler.start_trace(os.path.join(workdir, 'profile'))
        batch = perplexity.global_batch(next(data_iter), batch_sharding)
        if step == 0 and not config.init_from:
          state = setup.seed_buffers(state, batch, config.seed)   # routing centroids: k-means on the first batch
        if step == start:
          distributed.compile_together(train_step, 'train step', state, batch)
        state, step_metrics = train_step(state, batch, healthy)
        if t.nan_policy == 'halt':
          healthy = step_metrics['healthy']   # stays on the device: a failed step freezes the ones queued after it
        step += 1
        interval.add(step, step_metrics)
        unseen[step] = batch
        bar.update(1)
        if step == start + 1:  # compile time stays out of the throughput figures
          jax.block_until_ready(state)
          interval.restart_clock()
        if profile and step == profile[1] + 1:
          jax.block_until_ready(state)
          jax.profiler.stop_trace()
        stop = preemption.requested or checkpoints.reached_preemption(step) or (stop_at and step >= stop_at)
        last = step == t.num_steps
        eval_due = t.eval_every and (step % t.eval_every == 0 or last)
        save_due = (t.checkpoint_every and step % t.checkpoint_every == 0) or last or stop
        if interval.pending and (step % t.log_every == 0 or last or stop or save_due or eval_due):
          try:
            row = interval.row()
          except TrainingHalted as e:
            report = halt_lib.save(setup, state, unseen[e.step], e.step, workdir, saved_config)
            bad = report['non_finite_gradients']
            raise TrainingHalted(
                f'{e} Its state, batch and gradient report are in {halt_lib.directory(workdir)} '
                f'(non-finite gradients there: {", ".join(bad[:5]) + (" ..." if len(bad) > 5 else "") or "none"}'
                f'; loss {report["loss"]:.4g}).', e.step) from None
          unseen.clear()
          writer.write(step, row)
          bar.set_postfix(loss=f'{row["loss"]:.3f}', tok_s=f'{row.get("tokens_per_s", 0):.0f}')
        if eval_due:
          if val_batches is None:
            val_batches = perplexity.validation(config, t.eval_batches)
          result = perplexity.evaluate(eval_step, buckets, setup.weights(state), val_batches, batch_sharding,
                                       byte_level)
          writer.write(step, {f'val_{k}': v for k, v in result.items() if k not in ('by_position', 'tokens')})
          row.update({f'val_{k}': v for k, v in result.items() if k != 'by_position'})
        if save_due:
          checkpoints.save(step, state, data_iter, saved_config)
        if stop and not last:
          logging.info('stopping at step %d (%s); checkpoint saved', step,
                       'preemption' if preemption.requested else 'train.stop_after')
          break
  finally:
    bar.close()
    checkpoints.close()
    writer.close()
  return {'step': step, **row}

"""Metric rows to TensorBoard (tensorboardX, WORKDIR/tb) and to WORKDIR/metrics.jsonl, plus the progress bar."""
from __future__ import annotations

import json
import math
import os

import jax
import tqdm
from tensorboardX import SummaryWriter

LN2 = math.log(2.0)


class MetricWriter:
  """Writes on process 0 only; every row has `step`."""

  def __init__(self, workdir: str):
    self._active = jax.process_index() == 0
    if self._active:
      self._tb = SummaryWriter(os.path.join(workdir, 'tb'))
      self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')

  def write(self, step: int, row: dict) -> None:
    if not self._active:
      return
    row = {'step': int(step), **{k: _plain(v) for k, v in row.items()}}
    for key, value in row.items():
      if key != 'step' and isinstance(value, (int, float)) and math.isfinite(value):
        self._tb.add_scalar(key, value, step)
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()

  def close(self) -> None:
    if self._active:
      self._tb.close()
      self._jsonl.close()


def _plain(v):
  if hasattr(v, 'item'):
    v = v.item()
  return v


def loss_metrics(loss: float, byte_level: bool, prefix: str = '') -> dict:
  """Loss (nats/token), perplexity, and bits per byte where tokens are bytes."""
  out = {f'{prefix}loss': loss, f'{prefix}perplexity': math.exp(min(loss, 700.0))}
  if byte_level:
    out[f'{prefix}bits_per_byte'] = loss / LN2
  return out


def peak_memory_bytes() -> int | None:
  """Peak bytes in use on the first local device, where the backend reports it (GPU and TPU; not CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  return stats.get('peak_bytes_in_use')


def progress_bar(total: int, initial: int, enabled: bool):
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled or jax.process_index() != 0,
                   unit='step', dynamic_ncols=True, leave=True)

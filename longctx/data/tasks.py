"""Synthetic tasks: a named generator of ready rows, selected by `data.source = NAME`.

A task is registered with `@register_task(name)` on a class with `vocab_size(config) -> int`,
`check_config(config)` and `rows(config, split) -> grain.MapDataset` of dicts with int32 arrays `tokens`,
`segment_ids`, `positions` (and optionally `loss_mask`) of length `data.seq_len`; `packed = False` declares that
every row is a single document.
"""
from __future__ import annotations

import grain
import numpy as np

_TASKS: dict[str, type] = {}


def register_task(name: str):
  def wrap(cls):
    _TASKS[name] = cls
    return cls
  return wrap


def get(name: str):
  return _TASKS.get(name)


def names() -> list[str]:
  return sorted(_TASKS)


@register_task('random')
class RandomTokens:
  """Uniform random tokens in one segment per row: throughput benchmarks with nothing to learn and no I/O."""

  packed = False

  @staticmethod
  def vocab_size(config):
    return config.model.vocab_size

  @staticmethod
  def check_config(config):
    pass

  @staticmethod
  def rows(config, split):
    seq_len, vocab = config.data.seq_len, config.model.vocab_size
    offset = 0 if split == 'train' else 1 << 30

    def row(index):
      rng = np.random.default_rng([config.seed, offset + index])
      return {'tokens': rng.integers(0, vocab, seq_len, dtype=np.int32),
              'segment_ids': np.ones(seq_len, np.int32),
              'positions': np.arange(seq_len, dtype=np.int32)}

    return grain.MapDataset.range(1 << 40).map(row)

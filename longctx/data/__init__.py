"""Input pipelines (grain): sources -> per-host shard -> shuffle -> pack into rows -> batch, checkpointable.

With `data.niah_fraction` > 0 that share of the training rows of byte-level text become single-needle retrieval rows
(`longctx.data.needles`), the task `longctx.eval.niah` scores; validation rows stay plain text.

Every batch is a dict of int32 [batch, seq_len] arrays: `tokens`, `segment_ids` (0 = padding, documents numbered
from 1 inside a row) and `positions` (restarting at 0 at every document), optionally `loss_mask`. The model
predicts tokens[t + 1] at t only where both belong to the same document.

Under context parallelism (parallel.sequence = n > 1) every row is reordered once here (`balance`: zigzag, striped
or none, `parallel.load_balance`) so that each of the n sequence shards holds an even share of the causal work; the
next-token `targets` and their `target_weights` are taken before the reordering and travel with it.
"""
from __future__ import annotations

import glob as globlib
import os

import grain
import grain.experimental as grain_exp
import numpy as np

from longctx.config import ConfigError
from longctx.data import mqar, needles, sources, tasks  # noqa: F401  (mqar registers its task)

TEXT_SOURCES = ('stdlib', 'text')
TOKEN_DTYPES = ('uint16', 'uint32', 'int32')


def _source_names():
  return list(TEXT_SOURCES) + ['tokens'] + tasks.names()


def _glob(pattern: str, fieldname: str) -> list[str]:
  files = sorted(f for f in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(f))
  if not files:
    raise ConfigError(fieldname, pattern, 'a path or glob that matches at least one readable file')
  return files


def check_config(config) -> None:
  d = config.data
  if d.source not in _source_names():
    raise ConfigError('data.source', d.source, f'one of {", ".join(_source_names())}')
  if not 0 <= d.val_percent < 100:
    raise ConfigError('data.val_percent', d.val_percent, 'a percentage in [0, 100)')
  if d.source == 'text':
    _glob(d.path, 'data.path')
  elif d.source == 'tokens':
    if d.token_dtype not in TOKEN_DTYPES:
      raise ConfigError('data.token_dtype', d.token_dtype, f'one of {", ".join(TOKEN_DTYPES)}')
    for f in _glob(d.path, 'data.path'):
      if not f.endswith(('.npy', '.bin')):
        raise ConfigError('data.path', f, 'token files ending in .npy or .bin')
  elif d.source in tasks.names():
    tasks.get(d.source).check_config(config)
  needles.check_config(config)


def vocab_size(config) -> int:
  """The smallest model vocabulary that covers the source's tokens (0 when the source cannot tell)."""
  if config.data.source in TEXT_SOURCES:
    return sources.BYTE_VOCAB
  if config.data.source == 'tokens':
    return 0
  return tasks.get(config.data.source).vocab_size(config)


def rows_hold_several_documents(config) -> bool:
  """False where every row is one document, so attention needs no segment ids (and may use faster kernels)."""
  if config.data.source in TEXT_SOURCES:
    return True
  if config.data.source == 'tokens':
    return config.data.eos_id >= 0
  return getattr(tasks.get(config.data.source), 'packed', True)


def is_byte_level(config) -> bool:
  return config.data.source in TEXT_SOURCES


def _text_documents(config, split):
  d = config.data
  if d.source == 'stdlib':
    root, files = sources.stdlib_files()
  else:
    files = _glob(d.path, 'data.path')
    root = os.path.commonpath([os.path.dirname(f) for f in files])
  chosen = sources.split_files(files, root, split, d.val_percent)
  if not chosen:
    raise ConfigError('data.val_percent', d.val_percent,
                      f'a value that leaves files in the {split} split ({len(files)} files in all)')
  return sources.ByteDocuments(chosen)


def _token_rows(config, split):
  d = config.data
  files = _glob(d.path, 'data.path')
  frac = d.val_percent / 100
  start, stop = (0.0, 1.0 - frac) if split == 'train' else (1.0 - frac, 1.0)
  parts = [grain.MapDataset.source(sources.TokenWindows(f, d.seq_len, d.token_dtype, d.eos_id, start, stop))
           for f in files]
  parts = [p for p in parts if len(p)]
  if not parts:
    raise ConfigError('data.path', d.path, f'token files holding at least one {split} window of {d.seq_len} tokens')
  return grain.MapDataset.concatenate(parts) if len(parts) > 1 else parts[0]


def _pack(ds: grain.IterDataset, seq_len: int) -> grain.IterDataset:
  """Concatenate documents and cut fixed rows; grain numbers the documents of each row and their positions."""
  packed = grain_exp.ConcatThenSplitIterDataset(ds, length_struct={'tokens': seq_len})
  return packed.map(lambda r: {'tokens': r['tokens'], 'segment_ids': r['tokens_segment_ids'],
                               'positions': r['tokens_positions']})


def dataset(config, split: str, *, process_index: int = 0, process_count: int = 1,
            shuffle: bool | None = None) -> grain.IterDataset:
  """Batches of this process's share of `train.batch_size` rows, endless (the validation split cycles in order)."""
  d = config.data
  if split not in sources.SPLITS:
    raise ValueError(f'split {split!r} is not one of {sources.SPLITS}')
  shuffle = split == 'train' if shuffle is None else shuffle
  if d.source in TEXT_SOURCES:
    rows = _text_documents(config, split)
    needs_packing = True
  elif d.source == 'tokens':
    rows, needs_packing = _token_rows(config, split), False
  else:
    rows, needs_packing = tasks.get(d.source).rows(config, split), False
  ds = grain.MapDataset.source(rows) if not isinstance(rows, grain.MapDataset) else rows
  if shuffle:
    ds = ds.shuffle(seed=config.seed)
  if process_count > 1:
    # After the shuffle: for unpacked rows the global batch holds the same rows whatever the process count.
    ds = ds[process_index::process_count]
  ds = ds.repeat(None).to_iter_dataset(grain.ReadOptions(num_threads=d.num_threads,
                                                         prefetch_buffer_size=d.prefetch))
  if needs_packing:
    ds = _pack(ds, d.seq_len)
  if split == 'train' and d.get('niah_fraction', 0.0):
    ds = ds.random_map(needles.into_rows(d.niah_fraction, d.get('niah_scored', 'text')), seed=config.seed)
  ds = ds.batch(config.train.batch_size // process_count, drop_remainder=True)
  n = _sequence_shards(config)
  if n > 1:
    order = config.parallel.get('load_balance', 'zigzag')
    ds = ds.map(lambda b: balance(b, n, order))
  return ds


def next_token_targets(batch: dict, xp=np):
  """(targets, weights) [B, T]: the next token, counted (weight 1) only where it is in the same non-padding
  document and, with a `loss_mask`, scored. `xp` is numpy (the loader) or jax.numpy (the train step)."""
  tokens, seg = batch['tokens'], batch['segment_ids']
  not_last = xp.arange(tokens.shape[1]) < tokens.shape[1] - 1
  weights = ((seg == xp.roll(seg, -1, axis=1)) & (seg > 0) & not_last).astype(xp.float32)
  if 'loss_mask' in batch:
    weights = weights * xp.roll(batch['loss_mask'], -1, axis=1).astype(xp.float32)
  return xp.roll(tokens, -1, axis=1), weights


def balance(batch: dict, n: int, order: str) -> dict:
  """The batch with next-token targets and weights added (in the original order), then every [B, T] field
  reordered for n sequence shards (`longctx.parallel.context.permutation`)."""
  from longctx.parallel.context import permutation
  batch = {k: np.asarray(v) for k, v in batch.items()}
  targets, weights = next_token_targets(batch)
  perm = permutation(targets.shape[1], n, order)
  out = {**batch, 'targets': targets, 'target_weights': weights}
  return {k: v[:, perm] for k, v in out.items()}


def _sequence_shards(config) -> int:
  import jax
  from longctx.config import mesh_shape
  return mesh_shape(config.parallel, jax.device_count())['sequence']


def validation_batches(config, num_batches: int, **kwargs) -> list[dict[str, np.ndarray]]:
  """The first `num_batches` validation batches: the same every time, so evaluations are comparable."""
  it = iter(dataset(config, 'validation', **kwargs))
  return [next(it) for _ in range(num_batches)]

"""Validation loss overall and by in-document position bucket: how the loss falls as context grows."""
from __future__ import annotations

import jax
import numpy as np

from longctx import data
from longctx.train.metrics import loss_metrics


def global_batch(batch, sharding):
  """This process's rows -> one global array per field, laid out on the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def evaluate(eval_step, buckets, params, batches, sharding, byte_level: bool) -> dict:
  sums = np.zeros(len(buckets))
  counts = np.zeros(len(buckets))
  for batch in batches:
    s, c = eval_step(params, global_batch(batch, sharding))
    sums += np.asarray(s)
    counts += np.asarray(c)
  loss = float(sums.sum() / max(counts.sum(), 1))
  by_position = [{'positions': f'{lo}-{hi - 1}', 'tokens': int(n), 'loss': float(s / n) if n else None}
                 for (lo, hi), s, n in zip(buckets, sums, counts)]
  return {**loss_metrics(loss, byte_level), 'tokens': int(counts.sum()), 'by_position': by_position}


def validation(config, num_batches):
  return data.validation_batches(config, num_batches, process_index=jax.process_index(),
                                 process_count=jax.process_count())

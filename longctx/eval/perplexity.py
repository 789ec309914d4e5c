"""Validation loss and next-token accuracy, overall and by in-document position bucket: how the loss falls as
context grows. On tasks that score only answers (MQAR, needle retrieval) the accuracy is the recall."""
from __future__ import annotations

import jax
import numpy as np

from longctx import data
from longctx.parallel import distributed
from longctx.train.metrics import loss_metrics


def global_batch(batch, sharding):
  """This process's rows -> one global array per field, laid out on the mesh."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def evaluate(eval_step, buckets, weights, batches, sharding, byte_level: bool) -> dict:
  """Loss and next-token accuracy of `weights` ({'params', 'buffers'}) over `batches`, overall and by position."""
  sums, hits, counts = (np.zeros(len(buckets)) for _ in range(3))
  for i, batch in enumerate(batches):
    batch = global_batch(batch, sharding)
    if i == 0:
      distributed.compile_together(eval_step, 'eval step', weights, batch)
    s, h, c = eval_step(weights, batch)
    sums += np.asarray(s)
    hits += np.asarray(h)
    counts += np.asarray(c)
  total = max(counts.sum(), 1)
  by_position = [{'positions': f'{lo}-{hi - 1}', 'tokens': int(n), 'loss': float(s / n) if n else None,
                  'accuracy': float(a / n) if n else None}
                 for (lo, hi), s, a, n in zip(buckets, sums, hits, counts)]
  return {**loss_metrics(float(sums.sum() / total), byte_level), 'accuracy': float(hits.sum() / total),
          'tokens': int(counts.sum()), 'by_position': by_position}


def validation(config, num_batches):
  return data.validation_batches(config, num_batches, process_index=jax.process_index(),
                                 process_count=jax.process_count())

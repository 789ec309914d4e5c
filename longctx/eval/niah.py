"""Single needle in a haystack (S-NIAH, RULER style) for byte-level models.

A row is filler text from the run's validation split with one needle line at a chosen depth, then the question
(`longctx.data.needles`); the model must produce the value's digits after the final "is ". A row counts as retrieved
when every value byte is the argmax prediction given the bytes before it, which is exactly what greedy decoding
would write, computed in one forward pass. Accuracy by context length × needle depth (0 = the needle opens the
haystack, 1 = it closes it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx import data
from longctx.config import ConfigError
from longctx.data.needles import make_row

DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


def filler_bytes(config, min_bytes: int) -> np.ndarray:
  """Validation-split text of the run's corpus, at least `min_bytes` long (documents joined by newlines)."""
  it = iter(data.dataset(_one_row(config), 'validation'))
  parts, total = [], 0
  while total < min_bytes:
    row = next(it)['tokens'][0]
    text = row[row < 256].astype(np.uint8)
    parts.append(text)
    total += len(text)
  return np.concatenate(parts)


def _one_row(config):
  c = config.copy_and_resolve_references()
  c.train.batch_size, c.data.seq_len = 1, 4096
  return c


def evaluate(run, lengths, depths=DEPTHS, samples: int = 8, seed: int = 0) -> dict:
  if not data.is_byte_level(run.config):
    raise ConfigError('data.source', run.config.data.source, 'a byte-level source (stdlib, text) for niah')
  rng = np.random.default_rng(seed)
  filler = filler_bytes(run.config, 2 * max(lengths))
  graph, state = nnx.split(run.model())

  @jax.jit
  def retrieved(state, tokens, mask):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits = nnx.merge(graph, state)(tokens, positions, None)
    hit = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    return jnp.all(hit | (mask[:, :-1] == 0), axis=-1)

  rows = []
  for length in lengths:
    for depth in depths:
      batch = [make_row(rng, filler, length, depth) for _ in range(samples)]
      tokens, mask = (jnp.asarray(np.stack(x)) for x in zip(*batch))
      rows.append({'length': length, 'depth': depth, 'samples': samples,
                   'accuracy': float(np.mean(np.asarray(retrieved(state, tokens, mask))))})
  return {'task': 'niah', 'rows': rows, 'accuracy': float(np.mean([r['accuracy'] for r in rows]))}


def table(result: dict) -> str:
  depths = sorted({r['depth'] for r in result['rows']})
  lengths = sorted({r['length'] for r in result['rows']})
  cell = {(r['length'], r['depth']): r['accuracy'] for r in result['rows']}
  lines = ['| length \\ depth | ' + ' | '.join(f'{d:g}' for d in depths) + ' |', '|---' * (len(depths) + 1) + '|']
  lines += [f'| {n} | ' + ' | '.join(f'{cell[n, d]:.2f}' for d in depths) + ' |' for n in lengths]
  return '\n'.join(lines + [f'\nmean accuracy {result["accuracy"]:.3f}'])

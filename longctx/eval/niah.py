"""Single needle in a haystack (S-NIAH, RULER style) for byte-level models.

A row is filler text from the run's validation split with one needle line at a chosen depth,

    ... filler ... The special magic number for {key} is {value}. ... filler ...
    What is the special magic number for {key}? The special magic number for {key} is {value}

and the model must produce the value's digits after the final "is ". A row counts as retrieved when every value byte
is the argmax prediction given the bytes before it, which is exactly what greedy decoding would write, computed in
one forward pass. Keys are two random words, values seven random digits, both fresh per row. Accuracy by context
length × needle depth (0 = the needle opens the haystack, 1 = it closes it).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from longctx import data
from longctx.config import ConfigError
from longctx.data.sources import BOS

WORDS = ('amber', 'basil', 'cedar', 'delta', 'ember', 'fjord', 'garnet', 'harbor', 'indigo', 'juniper', 'kelp',
         'lilac', 'maple', 'nectar', 'onyx', 'pepper', 'quartz', 'raven', 'saffron', 'thistle', 'umber', 'violet',
         'willow', 'xenon', 'yarrow', 'zephyr')
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


def make_row(rng, filler: np.ndarray, length: int, depth: float):
  """(tokens [length], answer mask [length]: 1 where the next value byte is predicted)."""
  key = f'{rng.choice(WORDS)}-{rng.choice(WORDS)}'
  value = ''.join(rng.choice(list('0123456789'), 7))
  needle = f'\nThe special magic number for {key} is {value}.\n'.encode()
  query = f'\nWhat is the special magic number for {key}? The special magic number for {key} is '.encode()
  room = length - 1 - len(needle) - len(query) - len(value)
  if room < 0:
    raise ConfigError('--lengths', length, f'context lengths of at least {length - room} bytes')
  start = rng.integers(0, len(filler) - room)
  hay = filler[start:start + room]
  at = int(round(depth * room))
  tokens = np.concatenate([[BOS], hay[:at], np.frombuffer(needle, np.uint8), hay[at:],
                           np.frombuffer(query, np.uint8), np.frombuffer(value.encode(), np.uint8)]).astype(np.int32)
  mask = np.zeros(length, np.int32)
  mask[length - len(value) - 1:length - 1] = 1       # positions whose next token is a value byte
  return tokens, mask


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

"""Single-needle rows (RULER's S-NIAH) in byte-level text: what `longctx.eval.niah` scores, and what training rows
carry when `data.niah_fraction` > 0.

A row is text with one needle line at a chosen depth, then the question and its answer,

    ... text ... The special magic number for {key} is {value}. ... text ...
    What is the special magic number for {key}? The special magic number for {key} is {value}

keys two random words, values seven random digits, both fresh per row. Training rows are scored as ordinary text
(`data.niah_scored = 'text'`) or, with 'answer', only at the value's digits: every row then carries a `loss_mask`,
all ones for plain text rows, so that a small model's gradient is spent on the retrieval rather than on the filler.
"""
from __future__ import annotations

import numpy as np

from longctx.config import ConfigError
from longctx.data.sources import BOS

WORDS = ('amber', 'basil', 'cedar', 'delta', 'ember', 'fjord', 'garnet', 'harbor', 'indigo', 'juniper', 'kelp',
         'lilac', 'maple', 'nectar', 'onyx', 'pepper', 'quartz', 'raven', 'saffron', 'thistle', 'umber', 'violet',
         'willow', 'xenon', 'yarrow', 'zephyr')
VALUE_DIGITS = 7
SCORED = ('text', 'answer')


def _overhead(key_len: int) -> int:
  """Bytes a row spends on everything but filler with a key of that length: BOS, needle, question, value."""
  key = 'k' * key_len
  return (1 + len(f'\nThe special magic number for {key} is {"0" * VALUE_DIGITS}.\n') +
          len(f'\nWhat is the special magic number for {key}? The special magic number for {key} is ') + VALUE_DIGITS)


OVERHEAD = _overhead(2 * max(len(w) for w in WORDS) + 1)       # the longest key: a row needs more than this
_LEAST_OVERHEAD = _overhead(2 * min(len(w) for w in WORDS) + 1)


def make_row(rng: np.random.Generator, filler: np.ndarray, length: int, depth: float):
  """(tokens [length], answer mask [length]: 1 where the next token is a value byte) from filler bytes (uint8,
  longer than the room left for them)."""
  key = f'{rng.choice(WORDS)}-{rng.choice(WORDS)}'
  value = ''.join(rng.choice(list('0123456789'), VALUE_DIGITS))
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


def check_config(config) -> None:
  d = config.data
  fraction = d.get('niah_fraction', 0.0)
  if not 0 <= fraction <= 1:
    raise ConfigError('data.niah_fraction', fraction, 'a fraction of training rows in [0, 1]')
  if fraction and d.source not in ('stdlib', 'text'):
    raise ConfigError('data.niah_fraction', fraction, f'0 with data.source={d.source} (needles go into byte-level '
                      'text: stdlib or text)')
  scored = d.get('niah_scored', 'text')
  if scored not in SCORED:
    raise ConfigError('data.niah_scored', scored, f'one of {", ".join(SCORED)}')
  if fraction and d.seq_len <= OVERHEAD:
    raise ConfigError('data.seq_len', d.seq_len, f'more than {OVERHEAD} bytes to hold a needle row '
                      f'(data.niah_fraction={fraction})')


def into_rows(fraction: float, scored: str = 'text'):
  """A grain random map turning that fraction of packed text rows into needle rows built from their own bytes
  (one document, the needle at a uniform depth), scored as ordinary text or only at the answer (`SCORED`)."""
  answer_only = scored == 'answer'

  def as_text(row):
    return {**row, 'loss_mask': np.ones(len(row['tokens']), np.int32)} if answer_only else row

  def transform(row, rng: np.random.Generator):
    length = len(row['tokens'])
    if rng.random() >= fraction:
      return as_text(row)
    filler = row['tokens'][row['tokens'] < 256].astype(np.uint8)
    if len(filler) <= length - _LEAST_OVERHEAD:       # less text than the shortest key leaves room for
      return as_text(row)
    tokens, mask = make_row(rng, filler, length, rng.random())
    out = {'tokens': tokens, 'segment_ids': np.ones(length, np.int32), 'positions': np.arange(length, dtype=np.int32)}
    if answer_only:
      out['loss_mask'] = np.roll(mask, 1)             # the value bytes themselves
    return out

  return transform

"""Multi-query associative recall (MQAR; Arora et al., "Zoology", 2023) as a synthetic task.

A row of length L: N key-value pairs k₁ v₁ … k_N v_N (keys drawn without replacement from [1, V/2), values from
[V/2, V)), then the N keys again in a random order, each at a gap drawn from a power law p(i) ∝ a·i^{a−1} over the
(L − 2N)/2 query slots (a = 0.01: most queries land far from their pair). Each queried key is followed by its value,
which is the only token scored (`loss_mask`); every other position holds 0, or with `random_non_queries` a
uniformly random token (Zoology's `random_non_queries` option, off by default there too). Since the answer is
predicted from the key before it, the model never sees it early. (Zoology leaves the answer out of the input; here
it is the next token, which only later positions see, and every key is queried once.)
"""
from __future__ import annotations

import grain
import numpy as np

from longctx.config import ConfigError
from longctx.data.tasks import register_task


def mqar_row(rng: np.random.Generator, seq_len: int, vocab: int, num_pairs: int, power_a: float,
             random_non_queries: bool = False):
  half = vocab // 2
  keys = rng.choice(np.arange(1, half), size=num_pairs, replace=False)
  values = rng.choice(np.arange(half, vocab), size=num_pairs, replace=False)
  slots = (seq_len - 2 * num_pairs) // 2
  p = power_a * np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1)
  gaps = rng.choice(slots, size=num_pairs, replace=False, p=p / p.sum())
  tokens = rng.integers(0, vocab, seq_len) if random_non_queries else np.zeros(seq_len, np.int64)
  tokens[0:2 * num_pairs:2], tokens[1:2 * num_pairs:2] = keys, values
  at = 2 * num_pairs + 2 * gaps
  tokens[at], tokens[at + 1] = keys, values
  loss_mask = np.zeros(seq_len, np.int32)
  loss_mask[at + 1] = 1
  return tokens.astype(np.int32), loss_mask


@register_task('mqar')
class MQAR:
  """Config `data.mqar`: vocab (V, 8192 in Zoology), num_pairs (N), power_a (0.01), random_non_queries (False)."""

  packed = False

  @staticmethod
  def vocab_size(config):
    return config.data.mqar.vocab

  @staticmethod
  def check_config(config):
    m, seq = config.data.mqar, config.data.seq_len
    if m.num_pairs < 1 or 4 * m.num_pairs > seq:
      raise ConfigError('data.mqar.num_pairs', m.num_pairs, f'between 1 and data.seq_len/4 = {seq // 4}')
    if m.vocab // 2 - 1 < m.num_pairs:
      raise ConfigError('data.mqar.vocab', m.vocab, f'at least 2·(num_pairs + 1) = {2 * (m.num_pairs + 1)}')
    if not 0 < m.power_a <= 1:
      raise ConfigError('data.mqar.power_a', m.power_a, 'an exponent in (0, 1]')

  @staticmethod
  def rows(config, split):
    m, seq = config.data.mqar, config.data.seq_len
    offset = 0 if split == 'train' else 1 << 30

    def row(index):
      tokens, loss_mask = mqar_row(np.random.default_rng([config.seed, offset + index]), seq, m.vocab,
                                   m.num_pairs, m.power_a, bool(m.get('random_non_queries', False)))
      return {'tokens': tokens, 'segment_ids': np.ones(seq, np.int32), 'positions': np.arange(seq, dtype=np.int32),
              'loss_mask': loss_mask}

    return grain.MapDataset.range(1 << 40).map(row)

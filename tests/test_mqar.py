"""MQAR rows as Zoology defines them: disjoint key and value ranges, power-law gaps, only answers scored."""
import numpy as np
import pytest

from longctx import config as config_lib
from longctx import data
from longctx.data.mqar import mqar_row
from tests.conftest import small_config


def test_keys_values_and_answers_follow_the_definition():
  rng = np.random.default_rng(0)
  for _ in range(50):
    tokens, mask = mqar_row(rng, 256, 8192, 16, 0.01)
    keys, values = tokens[0:32:2], tokens[1:32:2]
    assert ((1 <= keys) & (keys < 4096)).all() and ((4096 <= values) & (values < 8192)).all()
    assert len(set(keys)) == 16
    answers = np.flatnonzero(mask)
    assert len(answers) == 16 and (answers >= 33).all() and ((answers - 32) % 2 == 1).all()
    pairs = dict(zip(keys, values))
    assert sorted(tokens[answers - 1]) == sorted(keys)                   # every key queried once
    assert all(pairs[k] == v for k, v in zip(tokens[answers - 1], tokens[answers]))


def test_filler_is_zero_unless_random_non_queries():
  rng = np.random.default_rng(2)
  tokens, mask = mqar_row(rng, 128, 8192, 8, 0.01)
  answers = np.flatnonzero(mask)
  filler = np.ones(128, bool)
  filler[:16] = False
  filler[answers] = filler[answers - 1] = False
  assert (tokens[filler] == 0).all()
  noisy, _ = mqar_row(rng, 128, 8192, 8, 0.01, random_non_queries=True)
  assert (noisy[16:] != 0).mean() > 0.9


def test_query_gaps_follow_the_power_law():
  rng = np.random.default_rng(1)
  gaps = np.concatenate([(np.flatnonzero(mqar_row(rng, 512, 8192, 8, 0.01)[1]) - 1 - 16) // 2 for _ in range(400)])
  # p(i) ∝ i^{-0.99} over 248 slots: the first tenth of the slots holds about 60% of the mass.
  share = np.mean(gaps < 25)
  assert 0.5 < share < 0.75, share


def test_only_answers_are_scored():
  cfg = small_config(**{'data.source': 'mqar', 'model.vocab_size': 8192, 'data.mqar.num_pairs': 4})
  config_lib.validate(cfg, 1)
  batch = next(iter(data.dataset(cfg, 'train')))
  assert batch['loss_mask'].sum() == 4 * cfg.train.batch_size


def test_too_many_pairs_is_a_config_error():
  cfg = small_config(**{'data.source': 'mqar', 'model.vocab_size': 8192, 'data.mqar.num_pairs': 40})
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg, 1)
  assert err.value.field == 'data.mqar.num_pairs'

"""Data pipelines: reproducible, resumable, packed without crossing documents, clear errors."""
import numpy as np
import pytest

from longctx import config as config_lib
from longctx import data
from longctx.data import sources
from tests.conftest import small_config


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


def test_same_seed_gives_same_batches_and_other_seed_differs():
  cfg = small_config()
  a = take(iter(data.dataset(cfg, 'train')), 3)
  b = take(iter(data.dataset(cfg, 'train')), 3)
  assert_same(a, b)
  c = take(iter(data.dataset(small_config(seed=7), 'train')), 3)
  assert not all(np.array_equal(x['tokens'], y['tokens']) for x, y in zip(a, c))


def test_iterator_state_restores_the_exact_next_batches():
  cfg = small_config()
  it = iter(data.dataset(cfg, 'train'))
  take(it, 4)
  state = it.get_state()
  expected = take(it, 3)
  fresh = iter(data.dataset(cfg, 'train'))
  fresh.set_state(state)
  assert_same(take(fresh, 3), expected)


def test_packed_rows_number_documents_and_restart_positions():
  cfg = small_config(**{'data.seq_len': 256, 'train.batch_size': 8})
  for batch in take(iter(data.dataset(cfg, 'train')), 3):
    seg, pos, tok = batch['segment_ids'], batch['positions'], batch['tokens']
    assert seg.shape == pos.shape == tok.shape == (8, 256)
    starts = np.concatenate([np.ones((8, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    assert (pos[starts] == 0).all()
    assert (pos[:, 1:][~starts[:, 1:]] == pos[:, :-1][~starts[:, 1:]] + 1).all()
    assert (np.diff(seg, axis=1) >= 0).all()
    # A document boundary inside a row follows an EOS or precedes a BOS, or is a piece of a longer document.
    assert tok.max() < sources.BYTE_VOCAB


def test_train_and_validation_files_are_disjoint_and_stable():
  root, files = sources.stdlib_files()
  train = set(sources.split_files(files, root, 'train', 2.0))
  val = set(sources.split_files(files, root, 'validation', 2.0))
  assert train and val and not train & val and train | val == set(files)
  assert val == set(sources.split_files(files, root, 'validation', 2.0))


def test_text_glob_source_reads_bytes(tmp_path):
  for i in range(30):
    (tmp_path / f'doc{i}.txt').write_bytes(f'document number {i} '.encode() * 5)
  cfg = small_config(**{'data.source': 'text', 'data.path': str(tmp_path / '*.txt'), 'data.val_percent': 20.0})
  config_lib.validate(cfg, 1)
  batch = next(iter(data.dataset(cfg, 'train')))
  text = bytes(t for t in batch['tokens'].ravel() if t < 256)
  assert b'document number' in text


def test_empty_glob_is_a_config_error(tmp_path):
  cfg = small_config(**{'data.source': 'text', 'data.path': str(tmp_path / '*.txt')})
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg, 1)
  assert err.value.field == 'data.path'


@pytest.mark.parametrize('suffix', ['.npy', '.bin'])
def test_token_files_split_documents_at_eos(tmp_path, suffix):
  rng = np.random.default_rng(0)
  stream = rng.integers(1, 1000, 64 * 50).astype(np.uint16)
  stream[::37] = 0
  path = str(tmp_path / f'tokens{suffix}')
  np.save(path, stream) if suffix == '.npy' else stream.tofile(path)
  cfg = small_config(**{'data.source': 'tokens', 'data.path': path, 'data.eos_id': 0, 'model.vocab_size': 1024})
  config_lib.validate(cfg, 1)
  batch = next(iter(data.dataset(cfg, 'train')))
  tok, seg, pos = batch['tokens'], batch['segment_ids'], batch['positions']
  after_eos = np.zeros_like(tok, bool)
  after_eos[:, 1:] = tok[:, :-1] == 0
  assert (pos[after_eos] == 0).all() and (seg[:, 1:][after_eos[:, 1:]] > seg[:, :-1][after_eos[:, 1:]]).all()


def test_per_host_shards_are_disjoint():
  cfg = small_config()
  a = next(iter(data.dataset(cfg, 'validation', process_index=0, process_count=2)))
  b = next(iter(data.dataset(cfg, 'validation', process_index=1, process_count=2)))
  assert a['tokens'].shape[0] == cfg.train.batch_size // 2
  assert not np.array_equal(a['tokens'], b['tokens'])


def _needle_rows(batches):
  """(tokens, segment_ids) of the rows holding a needle."""
  return [(row, seg) for b in batches for row, seg in zip(b['tokens'], b['segment_ids'])
          if b'special magic number' in bytes(row[row < 256].astype(np.uint8))]


def test_needle_rows_replace_their_share_of_training_rows_and_resume_exactly():
  cfg = small_config(**{'data.seq_len': 256, 'train.batch_size': 8, 'data.niah_fraction': 0.5})
  it = iter(data.dataset(cfg, 'train'))
  batches = take(it, 6)
  needles = _needle_rows(batches)
  assert 12 <= len(needles) <= 36
  for row, seg in needles:
    assert (seg == 1).all()
    text = bytes(row[1:].astype(np.uint8))
    key = text.split(b'\nThe special magic number for ')[1].split(b' is ')[0]
    value = text.split(b'\nThe special magic number for ' + key + b' is ')[1][:7]
    assert row[0] == sources.BOS and text.endswith(b'for ' + key + b' is ' + value) and value.isdigit()
  state = it.get_state()
  expected = take(it, 3)
  fresh = iter(data.dataset(cfg, 'train'))
  fresh.set_state(state)
  assert_same(take(fresh, 3), expected)
  assert not _needle_rows(take(iter(data.dataset(cfg, 'validation')), 4))


def test_needle_rows_scored_at_the_answer_only_weigh_its_digits_and_leave_text_rows_whole():
  cfg = small_config(**{'data.seq_len': 256, 'train.batch_size': 8, 'data.niah_fraction': 0.5,
                        'data.niah_scored': 'answer'})
  batches = take(iter(data.dataset(cfg, 'train')), 4)
  seen = {True: 0, False: 0}
  for b in batches:
    targets, weights = data.next_token_targets(b)
    for row, mask, target, weight in zip(b['tokens'], b['loss_mask'], targets, weights):
      needle = b'special magic number' in bytes(row[row < 256].astype(np.uint8))
      seen[needle] += 1
      if needle:
        assert mask.sum() == 7 and mask[-7:].all()
        assert bytes(target[weight > 0].astype(np.uint8)).isdigit() and weight.sum() == 7
      else:
        assert mask.all()
  assert seen[True] and seen[False]


@pytest.mark.parametrize('overrides,field', [
    ({'data.niah_fraction': 1.5}, 'data.niah_fraction'),
    ({'data.niah_fraction': 0.2, 'data.niah_scored': 'digits'}, 'data.niah_scored'),
    ({'data.niah_fraction': 0.2, 'data.source': 'mqar'}, 'data.niah_fraction'),
    ({'data.niah_fraction': 0.2, 'data.seq_len': 64}, 'data.seq_len'),
])
def test_needle_rows_refuse_a_bad_fraction_source_or_length(overrides, field):
  with pytest.raises(config_lib.ConfigError, match=field):
    data.check_config(small_config(**overrides))


def test_a_row_with_too_little_text_for_any_needle_stays_text():
  from longctx.data import needles
  transform = needles.into_rows(1.0)
  length = 256
  for text_bytes in (length - needles._LEAST_OVERHEAD, length - needles._LEAST_OVERHEAD + 1):
    tokens = np.full(length, sources.BOS, np.int32)
    tokens[:text_bytes] = 97
    row = {'tokens': tokens, 'segment_ids': np.ones(length, np.int32), 'positions': np.arange(length, dtype=np.int32)}
    for seed in range(20):
      out = transform(row, np.random.default_rng(seed))
      assert (out is row) == (text_bytes == length - needles._LEAST_OVERHEAD)
      assert len(out['tokens']) == length

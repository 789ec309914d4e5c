"""Context parallelism on fake devices: ring and all-gather attention against dense attention, forward and backward,
in every token order, with GQA, odd head counts, documents and windows; the reorderings themselves."""

import numpy as np
import pytest

from longctx.parallel import context
from tests.conftest import script_json

pytestmark = pytest.mark.xdist_group('context')


@pytest.fixture(scope='module')
def results():
  return script_json(['tests/helpers/context_attention.py'])


@pytest.mark.parametrize('method', ['ring', 'all_gather'])
@pytest.mark.parametrize('case', ['zigzag_gqa', 'striped_gqa', 'none_gqa', 'zigzag_docs_window',
                                  'striped_8dev_odd_heads', 'zigzag_docs_window_chunk5'])
def test_sharded_attention_equals_dense_forward_and_backward(results, method, case):
  r = results[f'{method}_{case}']
  assert r['finite']
  assert max(r['fwd'], r['dq'], r['dk'], r['dv']) < 1e-5, r


@pytest.mark.parametrize('method,case', [(m, c) for m in ('ring', 'all_gather')
                                         for c in ('zigzag_structured', 'none_structured')]
                         + [('ring', 'zigzag_structured_8dev')])
def test_block_structure_of_the_cudnn_path_equals_dense(results, method, case):
  # The causal / visible / skipped blocks cuDNN is given, checked with the same structure on XLA blocks.
  r = results[f'{method}_{case}']
  assert r['finite']
  assert max(r['fwd'], r['dq'], r['dk'], r['dv']) < 1e-5, r


@pytest.mark.parametrize('method', ['ring', 'all_gather'])
@pytest.mark.parametrize('case', ['zigzag_docs_window_prefix', 'none_structured_prefix'])
def test_persistent_tokens_every_query_sees_join_sharded_attention(results, method, case):
  # Against single-device prefixed attention; the prefix's own gradient is summed over the devices that hold it.
  r = results[f'{method}_{case}']
  assert r['finite']
  assert max(r['fwd'], r['dq'], r['dk'], r['dv'], r['dprefix_k'], r['dprefix_v']) < 1e-5, r


@pytest.mark.parametrize('method', ['ring', 'all_gather'])
@pytest.mark.parametrize('case', ['none_balanced_gqa', 'none_balanced_docs', 'none_balanced_structured',
                                  'none_balanced_structured_prefix'])
def test_rows_in_natural_order_balanced_inside_the_call_equal_dense(results, method, case):
  r = results[f'{method}_{case}']
  assert r['finite']
  assert max(v for key, v in r.items() if key != 'finite') < 1e-5, r


def test_balanced_ring_on_8_devices_and_the_zigzag_exchange_for_odd_and_even_axes(results):
  r = results['ring_none_balanced_structured_8dev']
  assert r['finite'] and max(r['fwd'], r['dq'], r['dk'], r['dv']) < 1e-5, r
  assert results['exchange'] == {'2': True, '3': True, '4': True, '8': True}


@pytest.mark.parametrize('order', context.ORDERS)
def test_reorderings_are_permutations_that_balance_causal_work(order):
  t, n = 48, 4
  perm = context.permutation(t, n, order)
  assert sorted(perm) == list(range(t))
  x = np.arange(t)[None]
  np.testing.assert_array_equal(np.asarray(context.restore(context.reorder(x, n, order), n, order)), x)
  work = [int(np.sum(perm.reshape(n, -1)[r] + 1)) for r in range(n)]    # causal pairs of each shard's queries
  if order != 'none':
    assert max(work) - min(work) <= t // n * n, work
  else:
    assert max(work) > 3 * min(work)


def test_balanced_rows_carry_targets_taken_in_the_original_order():
  from longctx import data
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 50, (2, 16))
  seg = np.repeat([[1] * 5 + [2] * 11], 2, 0)
  batch = {'tokens': tokens, 'segment_ids': seg, 'positions': np.zeros_like(seg), 'loss_mask': np.ones_like(seg)}
  out = data.balance(batch, 4, 'zigzag')
  perm = context.permutation(16, 4, 'zigzag')
  np.testing.assert_array_equal(out['tokens'], tokens[:, perm])
  want = np.roll(tokens, -1, axis=1)[:, perm]
  np.testing.assert_array_equal(out['targets'], want)
  w = np.ones((2, 16), int)
  w[:, 4] = 0            # last token of the first document
  w[:, 15] = 0           # end of the row
  np.testing.assert_array_equal(out['target_weights'], w[:, perm])


@pytest.mark.parametrize('overrides,field', [
    ({'model.pattern': 'titans_mac', 'parallel.load_balance': 'none', 'model.titans.segment_size': 32},
     'model.titans.segment_size'),
    ({'model.pattern': 'titans', 'parallel.load_balance': 'none', 'model.titans.chunk_size': 32},
     'model.titans.chunk_size'),
    ({'model.pattern': 'hgrn,attention'}, 'parallel.load_balance'),
    ({'data.seq_len': 60}, 'data.seq_len'),
    ({'parallel.context': 'gather'}, 'parallel.context'),
    ({'parallel.load_balance': 'random'}, 'parallel.load_balance'),
    ({'model.attention.conv_size': 4}, 'model.attention.conv_size'),       # zigzag order
    # cuDNN blocks: packed documents (the default data), striped order, or a window cannot take them.
    ({'model.attention.impl': 'cudnn'}, 'model.attention.impl'),
    ({'model.attention.impl': 'cudnn', 'data.source': 'mqar', 'model.vocab_size': 8192,
      'parallel.load_balance': 'striped'}, 'model.attention.impl'),
    ({'model.attention.impl': 'cudnn', 'data.source': 'mqar', 'model.vocab_size': 8192,
      'model.pattern': 'swa,attention'}, 'model.attention.impl'),
])
def test_context_parallel_settings_that_cannot_work_name_the_field(overrides, field):
  from longctx import config as config_lib
  from tests.conftest import small_config
  cfg = small_config(**{'parallel.data': 1, 'parallel.sequence': 4, **overrides})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg, 4)
  assert e.value.field == field


@pytest.fixture(scope='module')
def linear_results():
  return script_json(['tests/helpers/sharded_step.py', 'linear'], timeout=600)


@pytest.fixture(scope='module')
def titans_results():
  return script_json(['tests/helpers/sharded_step.py', 'titans'], timeout=600)


# Each stack: two steps, with a document starting inside a shard and one starting exactly at a shard boundary;
# sharded at once over the sequence, fsdp (parameters and batch) and tensor (heads of every mixer split over the
# tensor axis), against one device. Attention (with persistent tokens and a short convolution) joins both.
@pytest.mark.xdist_group('context_linear')
def test_every_linear_mixer_sharded_trains_as_on_one_device(linear_results):
  # hgrn, retnet, gla, hgrn2, deltanet, gated_deltanet, lightning, mamba2 and attention in one stack.
  r = linear_results['fsdp2_tensor2_sequence2']
  assert r['loss_diff'] < 1e-5 and r['param_rel'] < 1e-5, r


@pytest.mark.xdist_group('context_titans')
def test_every_titans_wiring_sharded_trains_as_on_one_device(titans_results):
  # titans (LMM), titans_mag, titans_mac and attention in one stack.
  r = titans_results['fsdp2_tensor2_sequence2']
  assert r['loss_diff'] < 1e-5 and r['param_rel'] < 1e-5, r


def test_context_attention_refuses_paths_that_cannot_run_here_by_name():
  import jax
  import jax.numpy as jnp
  import ml_collections
  from longctx.parallel.mesh import make_mesh
  mesh = make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 1}), jax.devices()[:1])
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 2, 8))
  pos = jnp.arange(8)[None]
  with pytest.raises(ValueError, match='cuDNN.*got dtype float32'):
    context.context_attention(q, q, q, pos, mesh=mesh, impl='cudnn')
  with pytest.raises(ValueError, match='impl .bogus.: one of auto, cudnn, xla, chunked'):
    context.context_attention(q, q, q, pos, mesh=mesh, impl='bogus')
  with pytest.raises(ValueError, match='dense blocks.*window 3'):
    context.context_attention(q, q, q, pos, mesh=mesh, impl='xla', window=3)


@pytest.fixture(scope='module')
def handed_results():
  return script_json(['tests/helpers/handed_recurrence.py'])


@pytest.mark.xdist_group('context_handed')
@pytest.mark.parametrize('case', ['seq2_lanes1', 'seq2_lanes4', 'seq4_lanes1', 'seq4_lanes2', 'seq4_lanes4'])
def test_a_handed_recurrence_equals_one_pass_over_the_row_whole_shards_and_as_a_wavefront(handed_results, case):
  # A tanh recurrence (not affine in its state) with documents, one starting exactly at a shard boundary.
  r = handed_results[case]
  assert r['finite']
  assert max(r['fwd'], r['dx'], r['da'], r['dfresh']) < 1e-6, r


def test_wavefront_lanes_divide_the_heads():
  assert context.wavefront_lanes(16, 2) == 4 and context.wavefront_lanes(16, 8) == 16
  assert context.wavefront_lanes(6, 2) == 3 and context.wavefront_lanes(7, 2) == 1

"""Routing Transformer layers in the model and the trainer: decoding semantics, centroids outside the optimizer
(EMA, commitment, k-means seeding, checkpoints, data-parallel sums), memory, config errors."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longctx import config as config_lib
from longctx.layers import registry
from longctx.layers import routing as routing_layer
from longctx.layers.common import rope
from longctx.ops import routing as ops
from longctx.ops.attention import naive
from longctx.parallel.mesh import make_mesh
from longctx.train import step as step_lib
from longctx.train.loop import train
from longctx.train.state import TrainSetup
from tests.conftest import script_json, small_config
from tests.helpers.linear import rel
from tests.helpers.mixers import prefill_then_decode
from tests.test_train import final_state

ROUTING = {'model.pattern': 'local,routing', 'model.routing.num_clusters': 4, 'model.routing.local_block': 16,
           'model.routing.ema_decay': 0.9, 'model.routing.commitment': 0.1}


def make(name='routing', **overrides):
  cfg = small_config(**{'model.routing.num_clusters': 3, 'model.routing.window': 6, 'model.routing.local_block': 8,
                        **overrides})
  return registry.get(name)(cfg, layer_index=0, rngs=nnx.Rngs(0)), cfg


def pure(mixer):
  """(x, positions, segment_ids) -> output, with the mixer rebuilt inside the caller's trace (it writes stats)."""
  graph, state = nnx.split(mixer)
  arrays = nnx.to_pure_dict(state)
  return lambda x, pos, seg=None: nnx.merge(graph, arrays)(x, positions=pos, segment_ids=seg)[0]


def inputs(t, seed=1, d=64):
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, t, d))
  return x, jnp.broadcast_to(jnp.arange(t), (2, t))


@pytest.mark.parametrize('name', ['routing', 'local'])
def test_prefix_only_membership_decodes_exactly_as_it_trains(name):
  mixer, _ = make(name, **{'model.routing.causal': True})
  x, pos = inputs(23)
  full, _ = mixer(x, positions=pos, segment_ids=None)
  assert np.isfinite(np.asarray(full)).all()
  np.testing.assert_allclose(prefill_then_decode(mixer, x, pos, 9), full, rtol=2e-5, atol=2e-6)


def test_prefix_only_membership_never_looks_ahead_forward_or_backward():
  mixer, _ = make(**{'model.routing.causal': True})
  x, pos = inputs(29, seed=2)
  out = jax.jit(lambda x: pure(mixer)(x, pos))
  base = out(x)
  changed = out(x.at[:, 17:].add(jax.random.normal(jax.random.PRNGKey(3), x[:, 17:].shape)))
  # Equal up to summation order (a later token moves an earlier one inside the sorted blocks, not its keys).
  np.testing.assert_allclose(np.asarray(base)[:, :17], np.asarray(changed)[:, :17], rtol=1e-5, atol=1e-7)
  grad = jax.jit(jax.grad(lambda x: jnp.sum(out(x)[:, 11])))(x)
  assert (np.asarray(grad)[:, 12:] == 0).all() and float(jnp.abs(grad[:, 11]).sum()) > 0


def test_balanced_membership_sends_no_gradient_to_earlier_positions():
  mixer, _ = make()
  x, pos = inputs(24, seed=4)
  for i in (3, 15):
    grad = jax.jit(jax.grad(lambda x: jnp.sum(pure(mixer)(x, pos)[:, i])))(x)
    assert (np.asarray(grad)[:, i + 1:] == 0).all()


def test_one_cluster_as_long_as_the_sequence_is_full_causal_attention_of_the_shared_keys():
  t = 21
  mixer, _ = make(**{'model.routing.heads': 4, 'model.num_heads': 4, 'model.routing.num_clusters': 1,
                     'model.routing.window': t, 'data.seq_len': t})
  x, pos = inputs(t, seed=5)
  q = mixer.q(x)
  u = rope(ops.layer_norm(q), pos, mixer.rope_theta)
  want = mixer.o(naive(u, u, mixer.v(x)))
  assert rel(mixer(x, positions=pos, segment_ids=None)[0], want) < 1e-5


def test_documents_do_not_see_each_other():
  mixer, _ = make(**{'model.routing.causal': True})
  x, pos = inputs(30, seed=6)
  seg = jnp.asarray([[1] * 13 + [2] * 17] * 2)
  out = jax.jit(lambda x: pure(mixer)(x, pos, seg))
  changed = out(x.at[:, :13].add(1.0))
  np.testing.assert_array_equal(np.asarray(out(x))[:, 13:], np.asarray(changed)[:, 13:])
  # Balanced clusters: documents of one row compete for cluster slots, but no token attends across documents.
  balanced, _ = make()
  grad = jax.jit(jax.grad(lambda x: jnp.sum(pure(balanced)(x, pos, seg)[:, 13:])))(x)
  assert (np.asarray(grad)[:, :13] == 0).all() and float(jnp.abs(grad[:, 13:]).sum()) > 0


def setup_and_batch(**overrides):
  cfg = small_config(**{**ROUTING, **overrides})
  setup = TrainSetup(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
  rng = np.random.default_rng(0)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  batch = {'tokens': jnp.asarray(rng.integers(0, 256, (b, t)), jnp.int32),
           'segment_ids': jnp.ones((b, t), jnp.int32), 'positions': jnp.broadcast_to(jnp.arange(t), (b, t))}
  return setup, setup.init(cfg.seed), batch


def test_centroids_live_outside_the_optimizer_and_move_by_the_ema_of_their_members():
  setup, state, batch = setup_and_batch()
  assert setup.has_buffers and 'centroids' not in json.dumps(jax.tree.map(lambda _: 0, state['params']))
  state = setup.seed_buffers(state, batch, 0)
  before, params = jax.tree.map(jnp.copy, (state['buffers'], state['params']))
  _, (_, _, stats) = jax.jit(lambda p, b: step_lib._loss_sums(setup, p, batch, b))(params, before)
  want = routing_layer.update_centroids(before, stats, 0.9, 1e-5)
  after, _ = step_lib.make_train_step(setup)(state, batch)
  for a, b, c in zip(jax.tree.leaves(after['buffers']), jax.tree.leaves(want), jax.tree.leaves(before)):
    assert rel(a, b) < 1e-5 and rel(a, c) > 1e-4
  # The objective's gradient reaches no centroid (the commitment loss stops it); the commitment reaches the queries.
  g_buf = jax.jit(jax.grad(lambda b: step_lib._loss_sums(setup, params, batch, b)[0]))(before)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_buf))
  unweighted = TrainSetup(small_config(**{**ROUTING, 'model.routing.commitment': 0.0}), setup.mesh)
  grad = lambda s: jax.jit(jax.grad(lambda p: step_lib._loss_sums(s, p, batch, before)[0]))(params)
  g1, g0 = grad(setup), grad(unweighted)
  q1, q0 = g1['blocks'][1]['mixer']['q']['kernel'], g0['blocks'][1]['mixer']['q']['kernel']
  assert rel(q1, q0) > 1e-6


def test_seeding_runs_kmeans_on_the_first_batch():
  setup, state, batch = setup_and_batch()
  seeded = setup.seed_buffers(state, batch, 0)
  c0 = state['buffers']['blocks'][1]['mixer']['centroids']
  c1 = seeded['buffers']['blocks'][1]['mixer']['centroids']
  assert c1.shape == c0.shape and rel(c1, c0) > 0.1
  _, (_, _, stats) = jax.jit(lambda p, b: step_lib._loss_sums(setup, p, batch, b))(seeded['params'], seeded['buffers'])
  counts = np.asarray(stats['blocks'][1]['mixer']['counts'])
  assert (counts > 0).sum() >= counts.size - 1      # k-means leaves (almost) no cluster empty


def test_centroids_survive_checkpoint_and_resume(tmp_path):
  cfg = small_config(**{**ROUTING, 'train.num_steps': 12, 'train.checkpoint_every': 4})
  straight, split = str(tmp_path / 'straight'), str(tmp_path / 'split')
  train(cfg, straight)
  train(small_config(**{**ROUTING, 'train.num_steps': 12, 'train.checkpoint_every': 4, 'train.stop_after': 5}), split)
  train(cfg, split)
  a, _ = final_state(cfg, straight)
  b, _ = final_state(cfg, split)
  assert 'buffers' in a
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope='module')
def sharded_steps():
  return script_json(['tests/helpers/sharded_step.py', 'routing'])


@pytest.mark.xdist_group('routing_sharded_steps')
@pytest.mark.parametrize('membership', ['balanced', 'causal'])
def test_sharded_training_gives_the_centroids_and_parameters_of_one_device_with_the_whole_batch(sharded_steps,
                                                                                                 membership):
  # Two steps of a local + routing stack with the batch over 2 devices, each row over 2 more (a document starts at
  # the shard boundary) and the heads over 2 more.
  out = sharded_steps[f'data2_tensor2_sequence2_{membership}']
  assert out['centroid_rel'] < 1e-5 and out['param_rel'] < 1e-5 and out['loss_diff'] < 1e-5


@pytest.fixture(scope='module')
def sharded_ops():
  return script_json(['tests/helpers/routing_context.py'])


@pytest.mark.xdist_group('routing_sharded_ops')
@pytest.mark.parametrize('case', ['balanced_seq4_w12_docs', 'balanced_seq4_w20', 'balanced_seq4_ties',
                                  'nearest_seq4_w5_docs', 'nearest_seq4_w16', 'local_seq4_block6_docs'])
def test_routing_over_a_sharded_sequence_equals_one_device_forward_and_backward(sharded_ops, case):
  r = sharded_ops[case]
  assert r['finite']
  assert max(r['fwd'], r['dq'], r['dk'], r['dv']) < 1e-5, r


@pytest.mark.xdist_group('routing_sharded_ops')
def test_sharded_balanced_routing_needs_a_fraction_of_one_devices_memory(sharded_ops):
  # T 16K, w 64, 256 clusters over 4 devices: no device holds the whole row's vectors or all the clusters' blocks
  # (the scores of its own tokens against every centroid, K x T/4, are what remains).
  m = sharded_ops['memory_seq4']
  assert m['sharded'] < 0.6 * m['one_device'], m


@pytest.mark.parametrize('overrides,field', [
    ({'model.routing.num_clusters': 6}, 'model.routing.num_clusters'),
    ({'model.routing.local_block': 12}, 'model.routing.local_block'),
    ({'parallel.load_balance': 'zigzag'}, 'parallel.load_balance'),
])
def test_routing_settings_a_sharded_sequence_cannot_run_name_the_field(overrides, field):
  from longctx import config as config_lib
  cfg = small_config(**{**ROUTING, 'parallel.data': 1, 'parallel.sequence': 4, 'parallel.load_balance': 'none',
                        **overrides})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg, 4)
  assert e.value.field == field


def test_balanced_routing_memory_grows_as_n_times_w_not_n_squared():
  t, w, d = 4096, 64, 16
  q = jax.ShapeDtypeStruct((1, t, 1, d), jnp.float32)
  c = jax.ShapeDtypeStruct((1, t // w, d), jnp.float32)
  f = jax.jit(jax.grad(lambda q, c: jnp.sum(ops.balanced(q, q, q, c, w)[0])))
  temp = f.lower(q, c).compile().memory_analysis().temp_size_in_bytes
  assert temp < t * t * 4 / 8, temp        # a dense [T, T] fp32 score matrix alone would be 64 MiB


@pytest.mark.parametrize('field,value,allowed', [
    ('model.routing.heads', 5, 'between 1 and model.num_heads=4'),
    ('model.routing.window', 100, 'between 1 and data.seq_len=64'),
    ('model.routing.ema_decay', 1.0, 'a decay in (0, 1)'),
    ('model.routing.num_clusters', 0, 'a positive count'),
])
def test_bad_routing_settings_name_the_field(field, value, allowed):
  cfg = small_config(**{'model.pattern': 'routing,routing', field: value})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg, 1)
  assert e.value.field == field and allowed in e.value.allowed


@pytest.mark.parametrize('size', ['tiny', 'wikitext', 'pg19'])
def test_routing_configs_validate_and_route_only_in_their_top_layers(size):
  import os
  from tests.conftest import ROOT
  cfg = config_lib.load_file(os.path.join(ROOT, 'configs', f'routing.py:size={size}'))
  config_lib.validate(cfg, 1)
  layers = cfg.model.pattern.split(',')
  assert set(layers) == {'local', 'routing'} and layers[-1] == 'routing' and layers[0] == 'local'
  assert routing_layer.Routing.window_of(cfg) * cfg.model.routing.num_clusters == cfg.data.seq_len
  if size == 'pg19':
    assert len(layers) == 22 and layers.count('routing') == 1
    assert (cfg.model.routing.heads, cfg.model.num_heads, cfg.data.seq_len) == (2, 8, 8192)
  full = config_lib.load_file(os.path.join(ROOT, 'configs', f'routing.py:size={size},attention=full'))
  assert full.model.pattern == 'attention' and full.model.num_layers == cfg.model.num_layers

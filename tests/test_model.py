"""The language model: parameter metadata, document isolation, remat and accumulation leave the math unchanged."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longctx import config as config_lib
from longctx.layers.routing import RoutingStats
from longctx.models import pattern, scan
from longctx.models.transformer import Block, LanguageModel
from longctx.parallel.mesh import make_mesh
from longctx.train import flops
from longctx.train.state import TrainSetup
from longctx.train.step import make_train_step
from tests.conftest import small_config

LOGICAL = {'embed', 'vocab', 'heads', 'kv_heads', 'head_dim', 'mlp', 'norm', 'layers'}


def test_every_parameter_carries_logical_axes():
  model = LanguageModel(small_config(), rngs=nnx.Rngs(0))
  params = jax.tree.leaves(nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
  assert params
  for p in params:
    axes = p.get_metadata()['logical_axes']
    assert len(axes) == p[...].ndim and set(axes) <= LOGICAL


@pytest.mark.parametrize('conv', [0, 4])
def test_a_document_never_sees_another_document(conv):
  cfg = small_config(**{'model.attention.conv_size': conv})
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  t = cfg.data.seq_len
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 256, (1, t)), jnp.int32)
  seg = jnp.asarray([[1] * 20 + [2] * 30 + [3] * (t - 50)], jnp.int32)
  pos = jnp.asarray([list(range(20)) + list(range(30)) + list(range(t - 50))], jnp.int32)
  base = model(tokens, pos, seg)
  changed = model(tokens.at[0, 25].set((tokens[0, 25] + 1) % 256), pos, seg)
  diff = np.abs(np.asarray(changed - base)).max(axis=(0, 2))
  assert (diff[:25] == 0).all() and (diff[50:] == 0).all() and (diff[25:50] > 0).all()


def test_pattern_resolution():
  assert pattern.resolve('attention', 3) == ['attention'] * 3
  assert pattern.resolve('attention, attention', 2) == ['attention', 'attention']
  with pytest.raises(config_lib.ConfigError, match='model.num_layers=3'):
    pattern.resolve('attention,attention', 3)


@pytest.mark.parametrize('ratio,placement,expected', [
    ('3:1', 'last', 'LLLA' * 2),
    ('3:1', 'first', 'ALLL' * 2),
    ('1:1', 'middle', 'LA' * 4),
    ('1:0', 'last', 'L' * 8),
    ('7:1', 'last', 'LLLLLLLA'),
    ('3:1', '0,5', 'ALLLLALL'),
    ('2:1', 'spread', 'LLALALLA'),
])
def test_hybrid_rule_places_attention_layers(ratio, placement, expected):
  names = pattern.hybrid(8, 'gated_deltanet', ratio, placement, 'swa')
  assert ''.join('A' if n == 'swa' else 'L' for n in names) == expected


def test_a_ratio_that_does_not_fit_lists_the_ones_that_do():
  with pytest.raises(config_lib.ConfigError) as err:
    pattern.hybrid(24, 'gated_deltanet', '6:1', 'last', 'attention')
  assert err.value.field == 'model.hybrid.ratio'
  assert '3:1' in err.value.allowed and '5:1' in err.value.allowed and '23:1' in err.value.allowed
  assert 'spread' in err.value.allowed


@pytest.mark.parametrize('ratio,attention_layers', [
    ('24:1', [23]), ('12:1', [11, 23]), ('6:1', [7, 15, 23]), ('3:1', [3, 7, 11, 15, 19, 23])])
def test_spread_placement_gives_the_hybrid_studys_24_layer_grid(ratio, attention_layers):
  names = pattern.hybrid(24, 'hgrn2', ratio, 'spread', 'attention')
  assert [i for i, n in enumerate(names) if n == 'attention'] == attention_layers


def _setup_and_batch(cfg, seed=0):
  mesh = make_mesh(cfg.parallel, jax.devices()[:1])
  setup = TrainSetup(cfg, mesh)
  rng = np.random.default_rng(seed)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  batch = {'tokens': jnp.asarray(rng.integers(0, 256, (b, t)), jnp.int32),
           'segment_ids': jnp.asarray(np.repeat([[1] * (t // 2) + [2] * (t - t // 2)], b, 0), jnp.int32),
           'positions': jnp.asarray(np.repeat([list(range(t // 2)) + list(range(t - t // 2))], b, 0), jnp.int32)}
  return setup, setup.init(cfg.seed), batch


def _one_step(cfg, seed=0):
  setup, state, batch = _setup_and_batch(cfg, seed)
  return make_train_step(setup)(state, batch)


def test_a_step_after_a_failed_one_changes_only_the_counter():
  setup, state, batch = _setup_and_batch(small_config())
  before = jax.tree.map(np.asarray, state)      # the step donates its input state
  state, metrics = make_train_step(setup)(state, batch, False)
  assert bool(metrics['finite']) and not bool(metrics['healthy'])
  assert int(state['step']) == int(before['step']) + 1
  for x, y in zip(jax.tree.leaves((state['params'], state['opt_state'])),
                  jax.tree.leaves((before['params'], before['opt_state']))):
    np.testing.assert_array_equal(np.asarray(x), y)


def rel(a, b):
  a, b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(a)]), np.concatenate([np.ravel(x) for x in jax.tree.leaves(b)])
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize('remat', ['full', 'dots_saveable', 'offload_dots'])
def test_remat_policies_do_not_change_the_step(remat):
  ref, m_ref = _one_step(small_config())
  out, m = _one_step(small_config(**{'model.remat': remat}))
  assert rel(out['params'], ref['params']) < 1e-6
  assert abs(float(m['loss']) - float(m_ref['loss'])) < 1e-6


def test_gradient_accumulation_equals_the_whole_batch():
  ref, m_ref = _one_step(small_config())
  out, m = _one_step(small_config(**{'train.grad_accum': 2}))
  assert abs(float(m['grad_norm']) - float(m_ref['grad_norm'])) < 1e-5 * float(m_ref['grad_norm'])
  assert rel(out['params'], ref['params']) < 1e-6


def test_flops_count_causal_attention_halved_and_windowed():
  assert flops.causal_pairs(4) == 10
  assert flops.causal_pairs(6, window=2) == 3 + 4 * 2
  cfg = small_config()
  setup = TrainSetup(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
  m = cfg.model
  tokens = cfg.train.batch_size * cfg.data.seq_len
  per_layer_attention = 4 * flops.causal_pairs(cfg.data.seq_len) * m.num_heads * (m.d_model // m.num_heads)
  expected = 6 * setup.matmul_param_count() * tokens + 3 * m.num_layers * per_layer_attention * cfg.train.batch_size
  assert flops.train_flops_per_step(setup) == pytest.approx(expected)


def test_fused_cross_entropy_matches_the_reference_forward_and_backward():
  from longctx.ops import cross_entropy
  ks = jax.random.split(jax.random.PRNGKey(0), 5)
  x = jax.random.normal(ks[0], (2, 7, 24))
  w = jax.random.normal(ks[1], (24, 37))
  targets = jax.random.randint(ks[2], (2, 7), 0, 37)
  d_nll, d_logz = jax.random.normal(ks[3], (2, 7)), jax.random.normal(ks[4], (2, 7))
  out, vjp = jax.vjp(lambda x, w: cross_entropy.fused(x, w, targets), x, w)
  ref, ref_vjp = jax.vjp(lambda x, w: cross_entropy.reference(x, w, targets), x, w)
  for a, b in zip(out, ref):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  for a, b in zip(vjp((d_nll, d_logz)), ref_vjp((d_nll, d_logz))):
    assert rel(a, b) < 1e-6
  xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
  out, vjp = jax.vjp(lambda x, w: cross_entropy.fused(x, w, targets), xb, wb)
  assert out[0].dtype == jnp.float32
  for a, b in zip(vjp((d_nll, d_logz)), ref_vjp((d_nll, d_logz))):
    assert a.dtype == jnp.bfloat16 and not np.isnan(np.asarray(a, np.float32)).any()
    assert rel(np.asarray(a, np.float32), b) < 2e-2


def test_token_loss_equals_cross_entropy_of_the_logits():
  cfg = small_config()
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  t = cfg.data.seq_len
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, t)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  targets = jnp.roll(tokens, -1, axis=1)
  nll, _ = model.token_loss(tokens, pos, None, targets)
  logits = model(tokens, pos, None)
  expected = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(nll, expected, rtol=1e-5, atol=1e-5)


def test_weight_decay_skips_norms_and_embeddings_unless_asked():
  from longctx.train.optimizer import decay_mask
  params = {'embed': np.zeros((4, 2)), 'blocks': {0: {'mlp': {'up': {'kernel': np.zeros((2, 3))}},
                                                      'mixer_norm': {'scale': np.zeros(2)}}}}
  mask = decay_mask(params, decay_embeddings=False)
  assert mask['embed'] is False and mask['blocks'][0]['mixer_norm']['scale'] is False
  assert mask['blocks'][0]['mlp']['up']['kernel'] is True
  assert decay_mask(params, decay_embeddings=True)['embed'] is True


def test_chunked_cross_entropy_matches_the_reference_and_holds_one_chunk_of_logits():
  from longctx.ops import cross_entropy
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  x, w = jax.random.normal(ks[0], (3, 42, 16)), jax.random.normal(ks[1], (16, 37)) * 0.3
  targets = jax.random.randint(ks[2], (3, 42), 0, 37)
  cot = tuple(jax.random.normal(ks[3], (2, 3, 42)))
  out, vjp = jax.vjp(lambda x, w: cross_entropy.chunked(x, w, targets, 7), x, w)
  ref, ref_vjp = jax.vjp(lambda x, w: cross_entropy.reference(x, w, targets), x, w)
  for a, b in zip(out + vjp(cot), ref + ref_vjp(cot)):
    assert np.isfinite(np.asarray(a)).all()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  shapes = (jax.ShapeDtypeStruct((2, 1024, 64), jnp.float32), jax.ShapeDtypeStruct((64, 8192), jnp.float32),
            jax.ShapeDtypeStruct((2, 1024), jnp.int32))
  temp = lambda f: jax.jit(jax.grad(lambda x, w, t: jnp.sum(f(x, w, t)[0]), argnums=(0, 1))).lower(
      *shapes).compile().memory_analysis().temp_size_in_bytes
  whole = 2 * 1024 * 8192 * 4
  assert temp(cross_entropy.fused) >= whole and temp(lambda *a: cross_entropy.chunked(*a, 16)) < whole / 4


def test_loss_chunks_do_not_change_the_step():
  from longctx.train.state import TrainSetup
  from longctx.train.step import _loss_sums
  from longctx.parallel.mesh import make_mesh
  losses = []
  for chunks in (1, 8):
    cfg = small_config(**{'model.loss_chunks': chunks})
    setup = TrainSetup(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
    state = setup.init(0)
    rng = np.random.default_rng(0)
    t = cfg.data.seq_len
    batch = {'tokens': jnp.asarray(rng.integers(0, 256, (2, t)), jnp.int32), 'segment_ids': jnp.ones((2, t), jnp.int32),
             'positions': jnp.broadcast_to(jnp.arange(t), (2, t))}
    value, grads = jax.value_and_grad(lambda p: _loss_sums(setup, p, batch)[0])(state['params'])
    losses.append((value, grads))
  np.testing.assert_allclose(losses[0][0], losses[1][0], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(losses[0][1]), jax.tree.leaves(losses[1][1])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_offload_policy_marks_saved_matmuls_for_host_memory():
  from longctx.parallel.mesh import make_mesh
  from longctx.train.state import TrainSetup
  from longctx.train.step import make_train_step

  def lowered(remat):
    cfg = small_config(**{'model.remat': remat})
    setup = TrainSetup(cfg, make_mesh(cfg.parallel, jax.devices()[:1]))
    t = cfg.data.seq_len
    batch = {'tokens': jnp.zeros((4, t), jnp.int32), 'segment_ids': jnp.ones((4, t), jnp.int32),
             'positions': jnp.broadcast_to(jnp.arange(t), (4, t))}
    return make_train_step(setup).lower(setup.abstract_state, batch).as_text()
  # The device-to-host placements are in the program; backends without host offload (XLA:CPU) drop them.
  assert 'annotate_device_placement' in lowered('offload_dots')
  assert 'annotate_device_placement' not in lowered('dots_saveable')


@pytest.mark.parametrize('keys,expected', [
    ('AAAA', (0, 1, 4)),
    ('LLLALLLA', (0, 4, 2)),
    ('BAAAAA', (1, 1, 5)),          # HGRN: the first layer has no forget-gate bound
    ('LLLLLLLA', (0, 1, 7)),        # 7:1 in eight layers: the attention layer stays outside
    ('ABCD', (0, 1, 0)),            # nothing repeats: all unrolled
    ('LLALLALLA', (0, 3, 3)),
])
def test_scan_plan_covers_the_longest_run_of_repeated_groups(keys, expected):
  p = scan.plan(list(keys))
  assert (p.start, p.period, p.repeats) == expected


def _stats_and_step(cfg):
  setup, state, batch = _setup_and_batch(cfg)

  @jax.jit
  def forward(weights, batch):
    model = setup.model(*weights.values())
    logits = model(batch['tokens'], batch['positions'], batch['segment_ids'])
    return logits, nnx.to_pure_dict(nnx.state(model, RoutingStats))
  logits, stats = forward(TrainSetup.weights(state), batch)
  return logits, stats, make_train_step(setup)(state, batch)


@pytest.mark.parametrize('overrides,plan_', [
    ({'model.num_layers': 3, 'model.remat': 'dots_saveable'}, (0, 1, 3)),
    # HGRN2's first layer has no bound: layer 0 and the last attention layer run outside the scan.
    ({'model.num_layers': 6, 'model.pattern': 'hybrid', 'model.hybrid.linear': 'hgrn2',
      'model.hybrid.ratio': '1:1', 'model.hybrid.placement': 'last'}, (1, 2, 2)),
    ({'model.num_layers': 3, 'model.pattern': 'hgrn', 'model.remat': 'full'}, (1, 1, 2)),
    # Routing layers differ in a static attribute (their layer index): unrolled, statistics written under remat.
    ({'model.pattern': 'routing', 'model.remat': 'full'}, (0, 1, 0)),
])
def test_scanned_layers_compute_the_unrolled_step(overrides, plan_):
  """Against the plain unrolled model without remat: same parameter layout, logits, routing statistics, loss and
  updated parameters; remat policies and HGRN's per-layer forget-gate bounds (none in its first layer) included."""
  plain = {k: v for k, v in overrides.items() if k != 'model.remat'}
  scanned_cfg = small_config(**overrides, **{'model.scan_layers': True})
  p = LanguageModel(scanned_cfg, rngs=nnx.Rngs(0)).layer_plan()
  assert (p.start, p.period, p.repeats) == plan_
  assert LanguageModel(small_config(**overrides), rngs=nnx.Rngs(0)).layer_plan() == scan.UNROLLED
  logits_ref, stats_ref, (ref, m_ref) = _stats_and_step(small_config(**plain))
  logits, stats, (out, m) = _stats_and_step(scanned_cfg)
  assert jax.tree.structure(out) == jax.tree.structure(ref)
  assert not np.isnan(np.asarray(logits)).any()
  assert rel(logits, logits_ref) < 1e-5
  if stats_ref:
    assert rel(stats, stats_ref) < 1e-5
  assert abs(float(m['loss']) - float(m_ref['loss'])) < 1e-5
  assert rel(out['params'], ref['params']) < 1e-5


def test_repeated_layers_are_initialised_together_with_their_own_draws():
  """Repeated blocks are created by one vmap over their keys: each layer gets its own values, drawn like an
  unrolled layer's (same shapes, metadata and scale)."""
  cfg = small_config(**{'model.num_layers': 3})
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  kernels = [np.asarray(block.mixer.q.kernel[...]) for block in model.blocks]
  alone = np.asarray(Block(cfg, 'attention', 0, rngs=nnx.Rngs(0)).mixer.q.kernel[...])
  assert all(k.shape == alone.shape for k in kernels)
  assert all(np.abs(a - b).max() > 0 for i, a in enumerate(kernels) for b in kernels[i + 1:])
  for k in kernels:
    assert abs(k.std() / alone.std() - 1) < 0.1
  assert model.blocks[2].mixer.q.kernel.get_metadata()['logical_axes'] == ('embed', 'heads', 'head_dim')


def test_parameters_drawn_on_the_host_equal_those_drawn_on_the_device():
  cfg = small_config(**{'model.pattern': 'local,routing'})
  states = []
  for place in ('host', 'device'):
    setup = TrainSetup(small_config(**{'model.pattern': 'local,routing', 'train.init_on': place}),
                       make_mesh(cfg.parallel, jax.devices()[:1]))
    assert (setup.host_device() is None) == (place == 'device')
    states.append(jax.device_get(setup.init(3)))
  assert jax.tree.structure(states[0]) == jax.tree.structure(states[1])
  for a, b in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1])):
    np.testing.assert_array_equal(a, b)

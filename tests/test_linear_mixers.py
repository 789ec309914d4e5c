"""Linear-attention mixers: documents stay apart, cached decoding equals the full forward, hybrids train."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from longctx import config as config_lib
from longctx.layers import registry
from longctx.train.loop import train
from tests.conftest import small_config
from tests.helpers.mixers import prefill_then_decode

MIXERS = ['deltanet', 'gated_deltanet', 'retnet', 'lightning', 'gla', 'hgrn2', 'hgrn', 'mamba2', 'titans']
CACHED = MIXERS + ['attention', 'swa']


def make(name, **overrides):
  cfg = small_config(**{'model.linear.chunk_size': 16, **overrides})
  return registry.get(name)(cfg, layer_index=0, rngs=nnx.Rngs(0)), cfg


def inputs(cfg, t, seed=0):
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, t, cfg.model.d_model))
  return x, jnp.broadcast_to(jnp.arange(t), (2, t))


@pytest.mark.parametrize('name', MIXERS)
def test_documents_do_not_see_each_other(name):
  mixer, cfg = make(name)
  x, pos = inputs(cfg, 40)
  seg = jnp.asarray([[1] * 15 + [2] * 25] * 2)
  y, _ = mixer(x, positions=pos, segment_ids=seg)
  y2, _ = mixer(x.at[:, 3].add(1.0), positions=pos, segment_ids=seg)
  diff = np.abs(np.asarray(y2 - y)).max(axis=(0, 2))
  assert (diff[:3] == 0).all() and (diff[15:] == 0).all() and (diff[3:15] > 0).all()


@pytest.mark.parametrize('name', CACHED)
def test_prefill_then_token_by_token_decoding_equals_the_full_forward(name):
  mixer, cfg = make(name, **{'model.attention.swa_window': 6})
  x, pos = inputs(cfg, 37, seed=1)
  full, _ = mixer(x, positions=pos, segment_ids=None)
  np.testing.assert_allclose(prefill_then_decode(mixer, x, pos, 20), full, rtol=2e-4, atol=2e-5)


def test_linear_chunk_must_divide_the_sequence():
  cfg = small_config(**{'model.pattern': 'gated_deltanet', 'model.linear.chunk_size': 48})
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg, 1)
  assert err.value.field == 'model.linear.chunk_size'


@pytest.mark.parametrize('pair', [MIXERS[i:i + 2] for i in range(0, len(MIXERS), 2)])
def test_every_mixer_builds_into_a_trainable_model(pair):
  from tests.test_model import _one_step
  cfg = small_config(**{'model.pattern': ','.join(pair), 'model.linear.chunk_size': 16})
  state, metrics = _one_step(cfg)
  assert np.isfinite(float(metrics['loss'])) and np.isfinite(float(metrics['grad_norm']))
  assert all(registry.get(name).flops(cfg, 48) > 0 for name in pair)


def test_a_hybrid_stack_with_sliding_window_layers_trains(tmp_path):
  cfg = small_config(**{'model.pattern': 'hybrid', 'model.hybrid.ratio': '1:1', 'model.hybrid.attention': 'swa',
                        'model.attention.swa_window': 16, 'train.num_steps': 30, 'model.linear.chunk_size': 16,
                        'train.checkpoint_every': 0})
  config_lib.validate(cfg, 1)
  train(cfg, str(tmp_path))
  lines = (tmp_path / 'metrics.jsonl').read_text().splitlines()
  losses = [json.loads(line)['loss'] for line in lines if '"loss"' in line]
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5
  saved = json.loads((tmp_path / 'config.json').read_text())
  assert saved['model']['pattern'] == 'hybrid'


def test_sliding_window_layer_sees_only_its_window():
  mixer, cfg = make('swa', **{'model.attention.swa_window': 5})
  x, pos = inputs(cfg, 30, seed=3)
  y, _ = mixer(x, positions=pos, segment_ids=None)
  y2, _ = mixer(x.at[:, 10].add(1.0), positions=pos, segment_ids=None)
  changed = np.abs(np.asarray(y2 - y)).max(axis=(0, 2)) > 0
  np.testing.assert_array_equal(changed, (np.arange(30) >= 10) & (np.arange(30) < 15))


def test_fixed_decays_follow_the_papers():
  from longctx.layers.retention import lightning_log_decay, retnet_log_decay
  np.testing.assert_allclose(np.exp(retnet_log_decay(4)), 1 - 2.0 ** -np.arange(5, 9), rtol=1e-6)
  first, last = lightning_log_decay(8, 0, 12), lightning_log_decay(8, 11, 12)
  np.testing.assert_allclose(-first, 2.0 ** (-8 * np.arange(1, 9) / 8) * (1 + 1e-5), rtol=1e-6)
  assert (np.abs(last) < 1e-4 * np.abs(first)).all()      # the deepest layer barely decays


@pytest.mark.parametrize('arg,attention_layers', [
    ('linear=gated_deltanet,ratio=3:1,size=340m', [3, 7, 11, 15, 19, 23]),
    ('linear=retnet,ratio=1:0,size=tiny', []),
    ('linear=deltanet,ratio=1:1,attention=swa,size=tiny', [1, 3]),
    ('linear=hgrn2,ratio=12:1,preset=study,size=340m', [11, 23]),
    ('preset=h1,size=340m', list(range(1, 24, 2))),
    ('preset=h2,size=1.3b', list(range(2, 24, 3))),
])
def test_hybrid_config_variants_resolve_and_validate(arg, attention_layers):
  import os
  from longctx.models.pattern import resolve
  from tests.conftest import ROOT
  cfg = config_lib.load_file(os.path.join(ROOT, 'configs', f'hybrid.py:{arg}'))
  config_lib.validate(cfg, 1)
  layers = resolve(cfg.model.pattern, cfg.model.num_layers, cfg.model.hybrid)
  assert [i for i, n in enumerate(layers) if n in ('attention', 'swa')] == attention_layers


def decode_step_by_step(model, tokens, prompt):
  """Logits of a prefill over `prompt` tokens followed by one-token decoding calls, jitted."""
  b, t = tokens.shape
  pos = jnp.broadcast_to(jnp.arange(t), (b, t))
  decode = nnx.jit(lambda m, tok, p, c: m.decode(tok, p, c))
  logits, caches = decode(model, tokens[:, :prompt], pos[:, :prompt], model.init_cache(b, t))
  steps = [logits]
  for i in range(prompt, t):
    logits, caches = decode(model, tokens[:, i:i + 1], pos[:, i:i + 1], caches)
    steps.append(logits)
  return np.concatenate(steps, axis=1)


def test_a_hybrid_model_decodes_as_it_computes_the_whole_sequence():
  from longctx.models.transformer import LanguageModel
  cfg = small_config(**{'model.pattern': 'gated_deltanet,swa,retnet,attention', 'model.num_layers': 4,
                        'model.linear.chunk_size': 16, 'model.attention.swa_window': 8})
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  t = 30
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, t)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  full = model(tokens, pos, None)
  np.testing.assert_allclose(decode_step_by_step(model, tokens, 12), full, rtol=1e-4, atol=1e-4)


def test_forget_gate_lower_bounds_rise_with_depth_and_decoding_uses_them():
  from longctx.models.transformer import LanguageModel
  cfg = small_config(**{'model.pattern': 'hgrn,hgrn2,gla,hgrn2,mamba2,hgrn2', 'model.num_layers': 6,
                        'model.linear.chunk_size': 16})
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  bounds = model.lower_bounds()   # log lb; None: no bound (lb = 0 in the first layer of each kind)
  assert bounds[0] is None and bounds[1] is None and bounds[2] is None and bounds[4] is None
  np.testing.assert_allclose(jnp.exp(bounds[3]), 1 / 3, rtol=1e-6)
  np.testing.assert_allclose(jnp.exp(bounds[5]), 2 / 3, rtol=1e-6)
  t = 21
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, t)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(t), (2, t))
  full = nnx.jit(lambda m: m(tokens, pos, None))(model)
  np.testing.assert_allclose(decode_step_by_step(model, tokens, 9), full, rtol=1e-4, atol=1e-4)
  graph, params = nnx.split(model, nnx.Param)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(nnx.merge(graph, p)(tokens, pos, None)[..., :8] ** 2)))(params)
  assert float(jnp.abs(grads['lower_bounds_hgrn2'][...]).sum()) > 0


def test_bounded_forget_gate_is_the_formula_with_finite_gradients():
  from longctx.layers.gated_linear import bounded_forget_gate
  x = jnp.concatenate([jax.random.normal(jax.random.PRNGKey(0), (500,)) * 8, jnp.array([-1e4, -95.0, 95.0, 1e4])])
  for lb in (0.0, 1e-40, 0.2, 0.95):
    log_bound = None if lb == 0 else jnp.full(x.shape, np.log(lb), jnp.float32)
    log_alpha, one_minus = bounded_forget_gate(x, log_bound)
    alpha = lb + (1 - lb) * jax.nn.sigmoid(x)
    np.testing.assert_allclose(jnp.exp(log_alpha), alpha, rtol=1e-5, atol=1e-30)
    np.testing.assert_allclose(one_minus, 1 - alpha, rtol=1e-5, atol=1e-6)
    if log_bound is None:
      continue
    grads = jax.grad(lambda x, b: jnp.sum(jnp.sin(bounded_forget_gate(x, b)[0])), argnums=(0, 1))(x, log_bound)
    assert all(bool(jnp.isfinite(g).all()) for g in grads)
    # d log α / d log lb = lb σ(−x) / α, in [0, 1]
    share = jnp.exp(log_bound + jax.nn.log_sigmoid(-x) - log_alpha)
    np.testing.assert_allclose(grads[1], jnp.cos(log_alpha) * share, rtol=1e-4, atol=1e-6)


def test_depth_lower_bounds_have_finite_gradients_when_softmax_rows_underflow():
  from longctx.models.transformer import LanguageModel
  cfg = small_config(**{'model.pattern': 'hgrn2,hgrn2,hgrn2', 'model.num_layers': 3, 'model.linear.chunk_size': 16})
  model = LanguageModel(cfg, rngs=nnx.Rngs(0))
  model.lower_bounds_hgrn2[...] = jnp.asarray([200.0, -200.0, 0.0])[:, None, None] * jnp.ones(
      model.lower_bounds_hgrn2.shape)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 19)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(19), (2, 19))
  graph, params = nnx.split(model, nnx.Param)
  loss = lambda p: jnp.sum(nnx.merge(graph, p)(tokens, pos, None) ** 2)
  grads = jax.jit(jax.grad(loss))(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))


@pytest.mark.parametrize('arg', ['variant=lmm,size=tiny', 'variant=lmm,size=340m'])
def test_titans_configs_validate(arg):
  import os
  from tests.conftest import ROOT
  cfg = config_lib.load_file(os.path.join(ROOT, 'configs', f'titans.py:{arg}'))
  config_lib.validate(cfg, 1)
  assert cfg.model.pattern == 'titans'


def test_titans_memory_stays_finite_on_adversarial_inputs():
  """4096 tokens of large activations, one token repeated and two alternating: the clamped inner updates keep the
  memory and every gradient finite."""
  mixer, cfg = make('titans', **{'model.titans.chunk_size': 16})
  d = cfg.model.d_model
  noise = lambda seed, scale: scale * jax.random.normal(jax.random.PRNGKey(seed), (1, 1024, d))
  a, b = noise(6, 30.0)[:, :1], noise(7, 30.0)[:, :1]
  x = jnp.concatenate([noise(5, 100.0), jnp.broadcast_to(50.0 * jnp.ones((d,)), (1, 1024, d)), noise(8, 1.0),
                       jnp.tile(jnp.concatenate([a, b], axis=1), (1, 512, 1))], axis=1)
  pos = jnp.arange(4096)[None]
  graph, params = nnx.split(mixer, nnx.Param)
  loss = lambda p: jnp.mean(nnx.merge(graph, p)(x, positions=pos, segment_ids=None)[0] ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))

"""Titans' memory: the chunked dual form equals the per-token-weight references, forward and backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.ops.delta_rule import naive_delta_rule
from longctx.ops.titans import MemorySpec, chunk_lmm, init_state, materialized_lmm, naive_lmm
from tests.helpers.linear import rel


def inputs(seed, b, t, h, dk, dv, spec, scale=1.0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  l2 = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  weights = [jax.random.normal(kk, (h,) + shape) * shape[0] ** -0.5
             for kk, shape in zip(jax.random.split(ks[7], spec.depth), spec.layer_shapes())]
  state = init_state(spec, weights, b)
  state['momentum'] = [0.1 * jax.random.normal(ks[6], s.shape) for s in state['momentum']]
  return dict(q=l2(jax.random.normal(ks[0], (b, t, h, dk))), k=l2(jax.random.normal(ks[1], (b, t, h, dk))),
              v=scale * jax.random.normal(ks[2], (b, t, h, dv)),
              theta=0.3 * jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h))),
              eta=jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h))),
              alpha=0.1 * jax.nn.sigmoid(jax.random.normal(ks[5], (b, t, h))), state=state)


NAMES = ('q', 'k', 'v', 'theta', 'eta', 'alpha', 'state')


def run(fn, x, w):
  def loss(*args):
    o, s = fn(*args)
    return jnp.sum(o * w) + sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(s)), (o, s)
  grads, (o, s) = jax.jit(jax.grad(loss, argnums=tuple(range(7)), has_aux=True))(*(x[n] for n in NAMES))
  return o, s, grads


def assert_close(fast, ref, x, out_tol=1e-4, grad_tol=1e-3):
  w = jax.random.normal(jax.random.PRNGKey(99), x['v'].shape)
  (o, s, g), (o_ref, s_ref, g_ref) = run(fast, x, w), run(ref, x, w)
  assert rel(o, o_ref) < out_tol
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s_ref)):
    assert rel(a, b) < out_tol
  for name, a, b in zip(NAMES, g, g_ref):
    for la, lb in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
      assert np.isfinite(np.asarray(la)).all() and rel(la, lb) < grad_tol, name


@pytest.mark.parametrize('depth,chunk,t,clip', [(2, 16, 32, 0.0), (1, 8, 19, 0.0), (3, 4, 13, 0.5)])
def test_dual_form_equals_materialized_chunks(depth, chunk, t, clip):
  spec = MemorySpec(dk=8, dv=8, depth=depth, expansion=2, grad_clip=clip)
  x = inputs(depth, 2, t, 2, 8, 8, spec)
  # The references take whole chunks; a padded last chunk has its own test.
  x = {n: (a[:, :t - t % chunk] if n != 'state' else a) for n, a in x.items()}
  assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=chunk),
               lambda *a: materialized_lmm(spec, *a, chunk), x)


def test_chunk_one_equals_the_token_recurrence():
  spec = MemorySpec(dk=8, dv=8, depth=2, expansion=2)
  x = inputs(5, 1, 11, 2, 8, 8, spec)
  assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=1), lambda *a: naive_lmm(spec, *a), x)


def test_a_padded_last_chunk_changes_nothing():
  spec = MemorySpec(dk=8, dv=8, depth=2, expansion=2)
  x = inputs(6, 1, 21, 2, 8, 8, spec)
  args = [x[n] for n in NAMES]
  o, s = chunk_lmm(spec, *args, chunk_size=8)
  o16, s16 = materialized_lmm(spec, *(a[:, :16] for a in args[:6]), args[6], 8)
  tail = [a[:, 16:] for a in args[:6]]
  np.testing.assert_allclose(o[:, :16], o16, rtol=1e-4, atol=1e-5)
  # The last 5 tokens form a chunk of their own: compare against the reference run on exactly those tokens.
  o5, s5 = materialized_lmm(spec, *tail, s16, 5)
  np.testing.assert_allclose(o[:, 16:], o5, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s), jax.tree.leaves(s5)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_linear_memory_chunk_one_without_momentum_or_decay_is_deltanet():
  spec = MemorySpec(dk=8, dv=6, depth=1)
  x = inputs(7, 2, 30, 2, 8, 6, spec)
  x['state']['momentum'] = [jnp.zeros_like(m) for m in x['state']['momentum']]
  zeros = jnp.zeros_like(x['theta'])
  o, s = chunk_lmm(spec, x['q'], x['k'], x['v'], x['theta'], zeros, zeros, x['state'], chunk_size=1)
  o_ref, s_ref = naive_delta_rule(x['q'], x['k'], x['v'], 2 * x['theta'], None,
                                  initial_state=x['state']['weights'][0], scale=1.0)
  assert rel(o, o_ref) < 1e-5 and rel(s['weights'][0], s_ref) < 1e-5


def test_forgetting_is_weight_decay_on_the_memory():
  spec = MemorySpec(dk=8, dv=6, depth=1)
  x = inputs(8, 1, 12, 1, 8, 6, spec)
  x['state']['momentum'] = [jnp.zeros_like(m) for m in x['state']['momentum']]
  zeros = jnp.zeros_like(x['theta'])
  _, s = chunk_lmm(spec, x['q'], x['k'], x['v'], x['theta'], zeros, x['alpha'], x['state'], chunk_size=1)
  M = x['state']['weights'][0][0, 0]
  for t in range(12):
    k, v = x['k'][0, t, 0], x['v'][0, t, 0]
    M = (1 - x['alpha'][0, t, 0]) * M - x['theta'][0, t, 0] * 2 * jnp.outer(k, k @ M - v)
  np.testing.assert_allclose(s['weights'][0][0, 0], M, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('chunk', [1, 8])
def test_documents_restart_the_memory(chunk):
  spec = MemorySpec(dk=8, dv=8, depth=2, expansion=2)
  x = inputs(9, 2, 24, 2, 8, 8, spec)
  seg = jnp.asarray([[1] * 5 + [2] * 12 + [3] * 7, [1] * 24])
  init = [w * 0.5 for w in x['state']['weights']]
  reference = (lambda *a: naive_lmm(spec, *a, segment_ids=seg, reset_weights=init)) if chunk == 1 else (
      lambda *a: materialized_lmm(spec, *a, chunk, segment_ids=seg, reset_weights=init))
  assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=chunk, segment_ids=seg, reset_weights=init), reference, x)
  # A later document sees nothing of an earlier one.
  args = [x[n] for n in NAMES]
  o, _ = chunk_lmm(spec, *args, chunk_size=chunk, segment_ids=seg, reset_weights=init)
  args[1] = args[1].at[0, 2].add(1.0)
  o2, _ = chunk_lmm(spec, *args, chunk_size=chunk, segment_ids=seg, reset_weights=init)
  changed = np.abs(np.asarray(o2 - o))[0].max(axis=(1, 2)) > 0
  assert changed[2:5].all() and not changed[5:].any() and not changed[:2].any()


MIRAS = [  # (attentional bias, retention, how it is checked)
    (dict(objective='lp', p=3.0, retention='lq', q=4.0), 'chunks'),          # Moneta
    (dict(objective='huber', retention='l2'), 'recurrence'),                  # Yaad
    (dict(objective='huber', retention='elastic_net', l1=1e-3), 'chunks'),
]


@pytest.mark.parametrize('miras,against', MIRAS, ids=['moneta', 'yaad', 'huber_elastic_net'])
def test_miras_dual_form_equals_the_references(miras, against):
  spec = MemorySpec(dk=8, dv=8, depth=2, expansion=2, **miras)
  t = 16 if against == 'chunks' else 6
  x = {n: (a[:, :t] if n != 'state' else a) for n, a in inputs(7, 2, 16, 2, 8, 8, spec, scale=2.0).items()}
  delta = 0.2 + jax.nn.softplus(jax.random.normal(jax.random.PRNGKey(3), x['theta'].shape))
  if against == 'chunks':
    assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=8, delta=delta),
                 lambda *a: materialized_lmm(spec, *a, 8, delta=delta), x)
  else:
    assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=1, delta=delta),
                 lambda *a: naive_lmm(spec, *a, delta=delta), x)


def test_miras_objective_gradients_are_the_stated_losses():
  """For a linear memory the per-token gradient is k ⊗ ∂f/∂e with e = Wᵀk − v, ∂f/∂e written out per objective."""
  from longctx.ops.titans import memory
  k, v, w = (jax.random.normal(key, shape) for key, shape in
             zip(jax.random.split(jax.random.PRNGKey(0), 3), [(8,), (6,), (8, 6)]))
  e = k @ w - v
  delta = jnp.asarray(0.7)
  eps = 1e-3
  stated = {
      'l2': 2 * e,
      'lp': 3 * e * jnp.sqrt(e ** 2 + eps ** 2),                       # p |e|_ε^{p−1} · e / |e|_ε
      'huber': jnp.where(jnp.abs(e) <= delta, 2 * e, 2 * delta * jnp.sign(e)),
  }
  assert float(jnp.mean(jnp.abs(e) > delta)) > 0.2            # both branches of the Huber loss are exercised
  for name, de in stated.items():
    spec = MemorySpec(dk=8, dv=6, depth=1, objective=name, p=3.0, smooth=eps)
    (g,) = jax.grad(lambda ws: memory.loss(spec, ws, k, v, delta=delta))([w])
    np.testing.assert_allclose(g, jnp.outer(k, de), rtol=1e-5, atol=1e-6)


def test_retention_maps():
  from longctx.ops.titans import memory
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 5, 4))
  lq = memory.retain(MemorySpec(dk=5, dv=4, retention='lq', q=4.0), w)
  norm = jnp.sum(w ** 4, axis=(-2, -1), keepdims=True) ** 0.25
  np.testing.assert_allclose(lq, w / norm ** 2, rtol=1e-5)
  en = memory.retain(MemorySpec(dk=5, dv=4, retention='elastic_net', l1=0.5), w)
  np.testing.assert_allclose(en, np.sign(w) * np.maximum(np.abs(w) - 0.5, 0), rtol=1e-6)
  assert (memory.retain(MemorySpec(dk=5, dv=4), w) == w).all()


@pytest.mark.parametrize('depth,chunk,t', [(2, 8, 16), (1, 4, 12)])
def test_per_channel_forgetting_equals_the_references(depth, chunk, t):
  """α [B, T, H, d]: the first layer's rows and the last layer's columns decay channel by channel."""
  spec = MemorySpec(dk=8, dv=8, depth=depth, expansion=2, grad_clip=0.5)
  x = {n: (a[:, :t] if n != 'state' else a) for n, a in inputs(11, 2, t, 2, 8, 8, spec).items()}
  x['alpha'] = 0.3 * jax.nn.sigmoid(jax.random.normal(jax.random.PRNGKey(4), x['k'].shape))
  seg = jnp.asarray([[1] * 3 + [2] * (t - 3), [1] * t])
  init = [w * 0.5 for w in x['state']['weights']]
  assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=chunk, segment_ids=seg, reset_weights=init),
               lambda *a: materialized_lmm(spec, *a, chunk, segment_ids=seg, reset_weights=init), x)
  if depth == 1:
    assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=1), lambda *a: naive_lmm(spec, *a), x)
  # Within one batch (gradients at its start) channel 3's gate moves only the first layer's row 3.
  one = {n: (a[:, :chunk] if n != 'state' else a) for n, a in x.items()}
  _, s = chunk_lmm(spec, *(one[n] for n in NAMES), chunk_size=chunk)
  one['alpha'] = one['alpha'].at[..., 3].set(0.9)
  _, s2 = chunk_lmm(spec, *(one[n] for n in NAMES), chunk_size=chunk)
  moved = np.abs(np.asarray(s2['weights'][0] - s['weights'][0])).max(axis=(0, 1, 3)) > 1e-6
  assert moved[3] and not moved[np.arange(8) != 3].any()


def test_anchor_batches_inside_a_chunk_are_the_anchor_sized_chunks():
  """Gradients anchored every 4 tokens inside scan steps of 12 equal chunks of 4 (one state kept per 12)."""
  spec = MemorySpec(dk=8, dv=8, depth=2, expansion=2, grad_clip=0.5)
  x = inputs(12, 2, 29, 2, 8, 8, spec)
  seg = jnp.asarray([[1] * 6 + [2] * 23, [1] * 9 + [2] * 20])
  assert_close(lambda *a: chunk_lmm(spec, *a, chunk_size=12, anchor=4, segment_ids=seg),
               lambda *a: chunk_lmm(spec, *a, chunk_size=4, segment_ids=seg), x, out_tol=1e-5, grad_tol=1e-5)
  with pytest.raises(ValueError, match='divide'):
    chunk_lmm(spec, *(x[n] for n in NAMES), chunk_size=12, anchor=5)


def test_kl_retention_is_memoras_mirror_step():
  """Linear memory, chunk 1, no momentum: W_t = Softmax((1 − α_t) log W_{t−1} − θ_t ∇ℓ) row by row, from the row
  softmax of the parameters; and the chunk form equals the per-token-weight reference at chunk 8."""
  spec = MemorySpec(dk=8, dv=6, depth=1, retention='kl')
  x = inputs(13, 1, 10, 1, 8, 6, spec)
  params = [jax.random.normal(jax.random.PRNGKey(5), (1, 8, 6))]
  x['state'] = init_state(spec, params, 1)
  W = jax.nn.softmax(params[0][0], axis=-1)
  np.testing.assert_allclose(x['state']['weights'][0][0, 0], W, rtol=1e-6)
  zeros = jnp.zeros_like(x['theta'])
  _, s = chunk_lmm(spec, x['q'], x['k'], x['v'], x['theta'], zeros, x['alpha'], x['state'], chunk_size=1)
  for t in range(10):
    k, v = x['k'][0, t, 0], x['v'][0, t, 0]
    grad = 2 * jnp.outer(k, k @ W - v)
    W = jax.nn.softmax((1 - x['alpha'][0, t, 0]) * jnp.log(W) - x['theta'][0, t, 0] * grad, axis=-1)
  np.testing.assert_allclose(s['weights'][0][0, 0], W, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jnp.sum(s['weights'][0], -1), 1.0, rtol=1e-6)
  spec2 = MemorySpec(dk=8, dv=8, depth=2, expansion=2, retention='kl', grad_clip=0.5)
  x = inputs(14, 2, 16, 2, 8, 8, spec2)
  x['state'] = init_state(spec2, [w[0] for w in x['state']['weights']], 2)
  seg = jnp.asarray([[1] * 5 + [2] * 11, [1] * 16])
  assert_close(lambda *a: chunk_lmm(spec2, *a, chunk_size=8, segment_ids=seg),
               lambda *a: materialized_lmm(spec2, *a, 8, segment_ids=seg), x)

"""Routing Transformer attention ops: balanced clusters, local blocks, centroid EMA, commitment loss."""
import jax
import jax.numpy as jnp
import numpy as np

from longctx.ops import routing
from longctx.ops.attention import naive
from tests.helpers.linear import rel


def qkv(t, seed=0, b=2, h=3, d=16):
  ks = jax.random.split(jax.random.PRNGKey(seed), 3)
  return tuple(jax.random.normal(key, (b, t, h, d)) for key in ks)


def test_one_cluster_of_the_whole_sequence_is_full_causal_attention_forward_and_backward():
  q, k, v = qkv(37)
  centroids = jax.random.normal(jax.random.PRNGKey(1), (3, 1, 16))
  do = jax.random.normal(jax.random.PRNGKey(2), q.shape)
  out, count = routing.balanced(q, k, v, centroids, 37)
  assert (np.asarray(count) == 1).all()
  assert rel(out, naive(q, k, v)) < 1e-5
  fast = jax.grad(lambda *a: jnp.sum(routing.balanced(*a, centroids, 37)[0] * do), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda *a: jnp.sum(naive(*a) * do), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(fast, ref):
    assert rel(a, b) < 1e-5


def test_balanced_routing_sends_no_gradient_backwards_in_time_and_averages_shared_tokens():
  t = 24
  q, k, v = qkv(t, seed=3)
  centroids = jax.random.normal(jax.random.PRNGKey(4), (3, 4, 16))
  out, count = routing.balanced(q, k, v, centroids, 8)       # 4 clusters × 8 = 32 > 24 slots: some tokens shared
  assert np.isfinite(np.asarray(out)).all() and float(count.max()) >= 2
  np.testing.assert_array_equal(np.asarray(out)[np.asarray(count) == 0], 0)
  for i in (5, 17):
    grads = jax.grad(lambda q, k, v: jnp.sum(routing.balanced(q, k, v, centroids, 8)[0][:, i]),
                     argnums=(0, 1, 2))(q, k, v)
    for g in grads:
      assert (np.abs(np.asarray(g))[:, i + 1:] == 0).all()


def balanced_reference(q, k, v, centroids, window):
  """Dense form: cluster c's members are its top-w tokens; each member attends causally to the members of each of
  its clusters, the results averaged over those clusters."""
  b, t, h, d = q.shape
  s = routing.scores(q, centroids)                                            # [B, H, K, T]
  member = jnp.sum(jax.nn.one_hot(jax.lax.top_k(s, window)[1], t), axis=-2) > 0   # [B, H, K, T]
  causal = np.tril(np.ones((t, t), bool))
  logits = jnp.einsum('bihd,bjhd->bhij', q, k) / np.sqrt(d)
  total, count = 0.0, 0.0
  for c in range(centroids.shape[1]):
    m = member[:, :, c]                                                        # [B, H, T]
    mask = m[..., :, None] & m[..., None, :] & causal
    p = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
    o = jnp.einsum('bhij,bjhd->bihd', jnp.where(mask, p, 0.0), v)
    total = total + jnp.where(jnp.moveaxis(m, 1, 2)[..., None], o, 0.0)
    count = count + jnp.moveaxis(m, 1, 2).astype(jnp.float32)
  return total / jnp.maximum(count, 1.0)[..., None]


def test_balanced_routing_equals_its_dense_form_forward_and_backward():
  q, k, v = qkv(23, seed=10)
  centroids = jax.random.normal(jax.random.PRNGKey(11), (3, 4, 16))
  do = jax.random.normal(jax.random.PRNGKey(12), q.shape)
  out, count = routing.balanced(q, k, v, centroids, 7)        # 4 × 7 = 28 slots over 23 tokens: shared and missed
  assert float(count.max()) >= 2 and float(count.min()) == 0
  assert rel(out, balanced_reference(q, k, v, centroids, 7)) < 1e-5
  fast = jax.grad(lambda *a: jnp.sum(routing.balanced(*a, centroids, 7)[0] * do), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda *a: jnp.sum(balanced_reference(*a, centroids, 7) * do), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(fast, ref):
    assert np.isfinite(np.asarray(a)).all() and rel(a, b) < 1e-5


def nearest_reference(q, k, v, centroids, window, segment_ids):
  """Dense form of prefix-only membership: a key counts when it is in the query's cluster and document, not later,
  and among the latest `window` such members up to the query (counted by a reverse cumulative sum)."""
  t, h = q.shape[1], q.shape[2]
  cluster = routing.assign(q, centroids)                                          # [B, T, H]
  group = jnp.moveaxis(cluster, 1, 2) * 1000 + segment_ids[:, None, :]           # [B, H, T]
  seen = (group[..., :, None] == group[..., None, :]) & np.tril(np.ones((t, t), bool))
  within = jnp.cumsum(seen[..., ::-1].astype(jnp.int32), axis=-1)[..., ::-1] <= window
  mask = seen & within
  logits = jnp.einsum('bihd,bjhd->bhij', q, k) / np.sqrt(q.shape[-1])
  p = jnp.where(mask, jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1), 0.0)
  return jnp.einsum('bhij,bjhd->bihd', p, v)


def test_prefix_only_routing_equals_its_dense_form_forward_and_backward():
  t, w = 29, 5
  q, k, v = qkv(t, seed=13)
  centroids = jax.random.normal(jax.random.PRNGKey(14), (3, 3, 16))
  seg = jnp.asarray(np.repeat([[1] * 11 + [2] * (t - 11)], 2, 0))
  do = jax.random.normal(jax.random.PRNGKey(15), q.shape)
  segs = jnp.broadcast_to(seg[..., None], seg.shape + (3,))
  fast_out = lambda *a: routing.nearest(*a, centroids, w, segment_ids=segs)[0]
  ref_out = lambda *a: nearest_reference(*a, centroids, w, seg)
  out = fast_out(q, k, v)
  assert np.isfinite(np.asarray(out)).all() and rel(out, ref_out(q, k, v)) < 1e-5
  fast = jax.grad(lambda *a: jnp.sum(fast_out(*a) * do), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda *a: jnp.sum(ref_out(*a) * do), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(fast, ref):
    assert np.isfinite(np.asarray(a)).all() and rel(a, b) < 1e-5


def test_local_heads_see_their_block_and_the_one_before():
  q, k, v = qkv(29, seed=5)
  block = 8
  out = routing.local(q, k, v, block)
  i, j = np.arange(29)[:, None], np.arange(29)[None, :]
  allowed = (j <= i) & (j >= (i // block - 1) * block)
  dense = lambda q, k, v: jnp.einsum('bhij,bjhd->bihd', jax.nn.softmax(
      jnp.where(allowed, jnp.einsum('bihd,bjhd->bhij', q, k) / 4.0, -jnp.inf), -1), v)
  assert rel(out, dense(q, k, v)) < 1e-5
  do = jax.random.normal(jax.random.PRNGKey(13), q.shape)
  fast = jax.grad(lambda *a: jnp.sum(routing.local(*a, block) * do), argnums=(0, 1, 2))(q, k, v)
  ref = jax.grad(lambda *a: jnp.sum(dense(*a) * do), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(fast, ref):
    assert rel(a, b) < 1e-5


def test_ema_update_is_the_hand_computation_and_commitment_spares_the_centroids():
  q = jax.random.normal(jax.random.PRNGKey(6), (2, 10, 1, 4))
  centroids = jax.random.normal(jax.random.PRNGKey(7), (1, 3, 4))
  sums, counts = routing.cluster_stats(q, centroids)
  u = np.asarray(routing.layer_norm(q)).reshape(20, 4)
  nearest = np.argmax(u @ np.asarray(centroids[0]).T, axis=1)
  for c in range(3):
    members = u[nearest == c]
    assert counts[0, c] == len(members)
    np.testing.assert_allclose(sums[0, c], members.sum(0), rtol=1e-5, atol=1e-6)
    new = routing.ema_update(centroids, sums, counts, decay=0.9, eps=1e-5)
    want = (0.9 * centroids[0, c] + 0.1 * members.sum(0) / (len(members) + 1e-5) if len(members)
            else centroids[0, c])
    np.testing.assert_allclose(new[0, c], want, rtol=1e-5, atol=1e-6)
  g_q, g_mu = jax.grad(routing.commitment_loss, argnums=(0, 1))(q, centroids)
  assert float(jnp.abs(g_q).sum()) > 0 and float(jnp.abs(g_mu).sum()) == 0


def test_kmeans_init_gives_distinct_centroids_that_split_the_batch():
  q = jax.random.normal(jax.random.PRNGKey(8), (2, 40, 2, 8))
  centroids = routing.kmeans_init(q, 4, 3, jax.random.PRNGKey(9))
  assert centroids.shape == (2, 4, 8) and np.isfinite(np.asarray(centroids)).all()
  _, counts = routing.cluster_stats(q, centroids)
  assert (np.asarray(counts) > 0).sum() >= 6

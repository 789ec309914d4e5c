"""Every attention path equals the naive reference, forward and backward, with segments, windows and GQA."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from longctx.ops import attention as attn

FWD_TOL, GRAD_TOL = 1e-5, 1e-5


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def inputs(seed, b, t, h, kv, d, segments):
  ks = jax.random.split(jax.random.PRNGKey(seed), 5)
  q = jax.random.normal(ks[0], (b, t, h, d))
  k = jax.random.normal(ks[1], (b, t, kv, d))
  v = jax.random.normal(ks[2], (b, t, kv, d))
  seg = jnp.sort(jax.random.randint(ks[3], (b, t), 1, 5), axis=1) if segments else None
  return q, k, v, seg, jax.random.normal(ks[4], (b, t, h, d))


def outputs_and_grads(impl, q, k, v, seg, do, window, chunk):
  f = lambda q, k, v: attn.attention(q, k, v, seg, window=window, impl=impl, chunk_size=chunk)
  out, vjp = jax.vjp(f, q, k, v)
  return out, vjp(do)


@pytest.mark.parametrize('impl', ['xla', 'chunked'])
@pytest.mark.parametrize('b,t,h,kv,d,window,segments,chunk', [
    (2, 67, 4, 2, 16, 0, True, 16),    # odd length, padded chunks, GQA, packed documents
    (1, 100, 3, 1, 8, 13, True, 32),   # sliding window, multi-query
    (2, 64, 2, 2, 16, 0, False, 16),
    (1, 50, 6, 3, 8, 7, False, 64),    # chunk larger than the sequence
    (1, 96, 2, 1, 8, 40, True, 16),    # window spanning several chunks
])
def test_paths_match_naive_forward_and_backward(impl, b, t, h, kv, d, window, segments, chunk):
  q, k, v, seg, do = inputs(hash((b, t, h, window)) % 1000, b, t, h, kv, d, segments)
  ref, ref_grads = outputs_and_grads('naive', q, k, v, seg, do, window, chunk)
  out, grads = outputs_and_grads(impl, q, k, v, seg, do, window, chunk)
  assert not any(np.isnan(np.asarray(x)).any() for x in (out, *grads))
  assert rel(out, ref) < FWD_TOL
  for name, g, r in zip('qkv', grads, ref_grads):
    assert rel(g, r) < GRAD_TOL, name


def test_chunked_bf16_inputs_stay_close_to_fp32_reference():
  q, k, v, seg, do = inputs(3, 2, 128, 4, 2, 32, True)
  ref, ref_grads = outputs_and_grads('naive', q, k, v, seg, do, 0, 32)
  cast = lambda x: x.astype(jnp.bfloat16)
  out, grads = outputs_and_grads('chunked', cast(q), cast(k), cast(v), seg, cast(do), 0, 32)
  assert rel(out, ref) < 2e-2
  for g, r in zip(grads, ref_grads):
    assert rel(g, r) < 3e-2


def test_no_query_sees_a_later_key_or_another_document():
  q, k, v, seg, _ = inputs(5, 1, 48, 2, 2, 8, True)
  base = attn.chunked(q, k, v, seg, chunk_size=16)
  t0 = 20
  v2 = v.at[:, t0].add(100.0)
  changed = np.abs(np.asarray(attn.chunked(q, k, v2, seg, chunk_size=16) - base)).max(axis=(0, 2, 3)) > 0
  seg_np = np.asarray(seg[0])
  expected = (np.arange(48) >= t0) & (seg_np == seg_np[t0])
  np.testing.assert_array_equal(changed, expected)


def test_auto_dispatch_by_platform_and_shape():
  choose = attn.choose_impl
  kw = dict(dtype=jnp.bfloat16, head_dim=128, seq_len=8192, has_segments=False)
  assert choose('auto', platform='gpu', **kw) == 'cudnn'
  assert choose('auto', platform='gpu', **{**kw, 'has_segments': True}) == 'cudnn'
  assert choose('auto', platform='cpu', **{**kw, 'seq_len': 256}) == 'xla'
  assert choose('auto', platform='tpu', **kw) == 'chunked'
  assert choose('naive', platform='gpu', **kw) == 'naive'
  with pytest.raises(ValueError, match='cudnn'):
    choose('cudnn', platform='cpu', **kw)


def test_segment_offsets_describe_each_run_and_flag_overflow():
  seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 3, 3], [5, 5, 5, 5, 5, 5, 5, 5], [1, 2, 3, 4, 5, 6, 7, 8]])
  starts, lengths, overflow = attn.segment_offsets(seg, max_segments=4)
  np.testing.assert_array_equal(starts, [[0, 3, 5, -1, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, 4]])
  np.testing.assert_array_equal(lengths, [[3, 2, 3, -1], [8, -1, -1, -1], [1, 1, 1, 1]])
  np.testing.assert_array_equal(overflow, [False, False, True])


@pytest.mark.parametrize('window,chunk', [(0, 8), (0, 64), (20, 16)])
def test_blocks_at_explicit_positions_equal_the_written_out_mask_forward_and_backward(window, chunk):
  # Context parallelism's blocks: queries and keys of different lengths at scattered positions and documents;
  # chunks of 8 and 16 divide neither length, 64 is one chunk each way.
  b, tq, tk, h, kv, d = 2, 37, 53, 6, 2, 8
  ks = jax.random.split(jax.random.PRNGKey(window + chunk), 4)
  q, do = jax.random.normal(ks[0], (b, tq, h, d)), jax.random.normal(ks[3], (b, tq, h, d))
  k, v = jax.random.normal(ks[1], (b, tk, kv, d)), jax.random.normal(ks[2], (b, tk, kv, d))
  rng = np.random.default_rng(chunk)
  q_pos = np.stack([rng.permutation(80)[:tq] for _ in range(b)])
  q_pos[:, 0] = -1                                                 # before every key
  q_pos = jnp.asarray(q_pos)
  k_pos = jnp.asarray(np.stack([rng.permutation(80)[:tk] for _ in range(b)]))
  q_seg, k_seg = (jnp.asarray(rng.integers(0, 2, (b, t))) for t in (tq, tk))

  def reference(q, k, v):
    s = jnp.einsum('btkgd,bskd->bkgts', q.reshape(b, tq, kv, h // kv, d), k) * d ** -0.5
    ok = (k_pos[:, None, :] <= q_pos[:, :, None]) & (q_seg[:, :, None] == k_seg[:, None, :])
    if window:
      ok = ok & (q_pos[:, :, None] - k_pos[:, None, :] < window)
    s = jnp.where(ok[:, None, None], s, -jnp.inf)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None])
    return jnp.einsum('bkgts,bskd->btkgd', p, v).reshape(b, tq, h, d), lse.reshape(b, h, tq)

  o, lse = attn.block_forward(q, k, v, q_pos, k_pos, q_seg, k_seg, window=window, chunk_size=chunk)
  ref_o, ref_lse = reference(q, k, v)
  seen = jnp.isfinite(ref_lse)
  assert not bool(jnp.all(seen)) and bool(jnp.any(seen))         # some queries see nothing here: o 0, lse −inf
  assert bool(jnp.all(jnp.isfinite(lse) == seen)) and rel(o, ref_o) < FWD_TOL
  assert float(jnp.max(jnp.abs(jnp.where(seen, lse - ref_lse, 0.0)))) < 1e-5
  grads = attn.block_backward(q, k, v, q_pos, k_pos, q_seg, k_seg, o, jnp.where(seen, lse, 0.0), do,
                              window=window, chunk_size=chunk)
  ref_grads = jax.grad(lambda q, k, v: jnp.sum(reference(q, k, v)[0] * do), argnums=(0, 1, 2))(q, k, v)
  for g, r in zip(grads, ref_grads):
    assert np.isfinite(np.asarray(g)).all() and rel(g, r) < GRAD_TOL

"""Ring and all-gather attention on 8 fake CPU devices against dense attention, forward and backward, for every
token order; prints one JSON line of relative RMS errors."""
import json
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longctx.ops.attention import naive, prefixed  # noqa: E402
from longctx.parallel import context  # noqa: E402
from longctx.parallel.mesh import make_mesh  # noqa: E402
import ml_collections  # noqa: E402


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.sqrt(np.mean((a - b) ** 2)) / (np.sqrt(np.mean(b ** 2)) + 1e-30))


def case(mesh, n, method, order, b, t, h, kv, d, window, docs, seed, prefix_len=0, **kw):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q = jax.random.normal(ks[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, kv, d)) for key in ks[1:3])
  do = jax.random.normal(ks[3], (b, t, h, d))
  prefix = tuple(jax.random.normal(key, (b, prefix_len, kv, d)) for key in ks[4:6]) if prefix_len else None
  seg = np.ones((b, t), np.int32)
  pos = np.broadcast_to(np.arange(t), (b, t)).copy()
  if docs:
    cut = t // 3 + 1
    seg[:, cut:] = 2
    pos[:, cut:] -= cut
  seg, pos = jnp.asarray(seg), jnp.asarray(pos)
  if prefix is None:
    ref = lambda q, k, v, prefix: naive(q, k, v, seg, window=window)
  else:
    ref = lambda q, k, v, prefix: prefixed(q, k, v, *prefix, seg, window=window, block=16)
  ref_o, ref_vjp = jax.vjp(ref, q, k, v, prefix)
  ref_g = ref_vjp(do)
  # Reorder the rows as the data loader would, run sharded, restore.
  perm = lambda x: context.reorder(x, n, order)
  absolute = jnp.broadcast_to(jnp.arange(t), (b, t))
  rq, rk, rv, rdo, rpos, rseg = (perm(x) for x in (q, k, v, do, absolute, seg))

  def loss(q, k, v, prefix):
    o = context.context_attention(q, k, v, rpos, None if kw.get('impl') == 'xla' else rseg, mesh=mesh,
                                  method=method, window=window, order=order, prefix=prefix, **kw)
    return jnp.sum(o * rdo), o

  (_, o), g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(rq, rk, rv, prefix)
  back = lambda x: context.restore(x, n, order)
  errs = [rel(back(o), ref_o)] + [rel(back(a), r) for a, r in zip(g[:3], ref_g[:3])]
  result = {'fwd': errs[0], 'dq': errs[1], 'dk': errs[2], 'dv': errs[3]}
  if prefix is not None:
    result['dprefix_k'], result['dprefix_v'] = (rel(a, r) for a, r in zip(g[3], ref_g[3]))
  result['finite'] = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves((o, g)))
  return result


def exchange(devices):
  """Per sequence-axis size (odd and even): whether to_zigzag of each shard of a row in natural order gives that
  shard of `reorder(row, n, 'zigzag')`, and from_zigzag brings it back."""
  out = {}
  for n in (2, 3, 4, 8):
    mesh = make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': n}), devices[:n])
    row = jnp.broadcast_to(jnp.arange(4 * n * 3), (2, 4 * n * 3))
    spec = jax.sharding.PartitionSpec(None, 'sequence')
    there = jax.jit(context.map_shards(lambda x: context.to_zigzag(x, 'sequence', n), mesh, (spec,), spec))(row)
    back = jax.jit(context.map_shards(lambda x: context.from_zigzag(x, 'sequence', n), mesh, (spec,), spec))(there)
    out[str(n)] = bool((there == context.reorder(row, n, 'zigzag')).all()) and bool((back == row).all())
  return out


def main():
  devices = jax.devices()
  out = {}
  mesh = make_mesh(ml_collections.ConfigDict({'data': 2, 'fsdp': 1, 'tensor': 1, 'sequence': 4}), devices)
  mesh8 = make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 8}), devices)
  for method in ('ring', 'all_gather'):
    for order in context.ORDERS:
      out[f'{method}_{order}_gqa'] = case(mesh, 4, method, order, 2, 48, 6, 2, 16, 0, False, 1)
    out[f'{method}_zigzag_docs_window'] = case(mesh, 4, method, 'zigzag', 2, 40, 3, 3, 8, 7, True, 2)
    out[f'{method}_striped_8dev_odd_heads'] = case(mesh8, 8, method, 'striped', 1, 64, 5, 5, 8, 0, True, 3)
    # Chunks of 5 that divide neither the shard nor the gathered row.
    out[f'{method}_zigzag_docs_window_chunk5'] = case(mesh, 4, method, 'zigzag', 2, 40, 3, 3, 8, 7, True, 2,
                                                      chunk_size=5)
  # Persistent tokens every query sees: chunked blocks with documents and a window, and the structured blocks.
  for method in ('ring', 'all_gather'):
    out[f'{method}_zigzag_docs_window_prefix'] = case(mesh, 4, method, 'zigzag', 2, 40, 3, 3, 8, 7, True, 6,
                                                      prefix_len=5)
    out[f'{method}_none_structured_prefix'] = case(mesh, 4, method, 'none', 2, 48, 6, 2, 16, 0, False, 7,
                                                   prefix_len=4, impl='xla')
  # The block structure cuDNN runs (ring steps, or the blocks of the gathered K/V), on dense XLA blocks.
  for method in ('ring', 'all_gather'):
    for order in ('zigzag', 'none'):
      out[f'{method}_{order}_structured'] = case(mesh, 4, method, order, 2, 48, 6, 2, 16, 0, False, 4, impl='xla')
  out['ring_zigzag_structured_8dev'] = case(mesh8, 8, 'ring', 'zigzag', 1, 64, 5, 5, 8, 0, False, 5, impl='xla')
  # Rows in natural order balanced inside the call (to zigzag and back): chunked blocks with and without documents,
  # the structured blocks, persistent tokens, 8 devices with odd heads.
  for method in ('ring', 'all_gather'):
    out[f'{method}_none_balanced_gqa'] = case(mesh, 4, method, 'none', 2, 48, 6, 2, 16, 0, False, 8, balance=True)
    out[f'{method}_none_balanced_docs'] = case(mesh, 4, method, 'none', 2, 40, 3, 3, 8, 0, True, 9, balance=True)
    out[f'{method}_none_balanced_structured'] = case(mesh, 4, method, 'none', 2, 48, 6, 2, 16, 0, False, 10,
                                                     impl='xla', balance=True)
    out[f'{method}_none_balanced_structured_prefix'] = case(mesh, 4, method, 'none', 2, 48, 6, 2, 16, 0, False, 11,
                                                            prefix_len=4, impl='xla', balance=True)
  out['ring_none_balanced_structured_8dev'] = case(mesh8, 8, 'ring', 'none', 1, 64, 5, 5, 8, 0, False, 12,
                                                   impl='xla', balance=True)
  out['exchange'] = exchange(devices)
  print(json.dumps(out))


if __name__ == '__main__':
  main()

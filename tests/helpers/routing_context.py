"""Routing attention on fake CPU devices with the sequence sharded, against the single-device forms, forward and
backward; prints one JSON line of relative RMS errors."""
import json
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from longctx.layers.routing import per_head  # noqa: E402
from longctx.ops import routing as ops  # noqa: E402
from longctx.parallel import routing as sharded  # noqa: E402
from longctx.parallel.mesh import make_mesh  # noqa: E402
from tests.helpers.context_attention import rel  # noqa: E402


def inputs(b, t, h, d, clusters, docs, seed, repeat=False):
  ks = jax.random.split(jax.random.PRNGKey(seed), 6)
  q, k, v, route, do = (jax.random.normal(key, (b, t, h, d)) for key in ks[:5])
  if repeat:      # the same routed vector at many positions: equal scores, ties broken by position
    route = route.at[:, 1::3].set(route[:, :1])
  centroids = ops.layer_norm(jax.random.normal(ks[5], (h, clusters, d)))
  seg = None
  if docs:
    seg = np.ones((b, t), np.int32)
    seg[:, t // 3 + 1:] = 2
    seg[:, t // 2:] = 3          # a document that starts exactly where a shard starts (2 or 4 shards)
    seg = jnp.asarray(seg)
  return q, k, v, route, centroids, do, seg


def balanced_case(mesh, window, *, b=2, t=48, h=3, d=8, clusters=4, docs=False, seed=0, repeat=False):
  q, k, v, route, centroids, do, seg = inputs(b, t, h, d, clusters, docs, seed, repeat)

  def ref(q, k, v):
    return ops.balanced(q, k, v, centroids, window, route=route, segment_ids=per_head(seg, h))[0]

  def run(q, k, v):
    return sharded.sharded_balanced(q, k, v, centroids, window, route=route, segment_ids=seg, mesh=mesh)

  return compare(ref, jax.jit(run), q, k, v, do)


def nearest_case(mesh, window, *, b=2, t=48, h=3, d=8, clusters=4, docs=False, seed=7):
  q, k, v, route, centroids, do, seg = inputs(b, t, h, d, clusters, docs, seed)

  def ref(q, k, v):
    return ops.nearest(q, k, v, centroids, window, route=route, segment_ids=per_head(seg, h))[0]

  def run(q, k, v):
    return sharded.sharded_nearest(q, k, v, centroids, window, route=route, segment_ids=seg, mesh=mesh)

  return compare(ref, jax.jit(run), q, k, v, do)


def local_case(mesh, block, *, b=2, t=48, h=3, d=8, docs=False, seed=1):
  q, k, v, _, _, do, seg = inputs(b, t, h, d, 2, docs, seed)
  ref = lambda q, k, v: ops.local(q, k, v, block, segment_ids=per_head(seg, h))
  run = lambda q, k, v: sharded.sharded_local(q, k, v, block, seg, mesh=mesh)
  return compare(ref, jax.jit(run), q, k, v, do)


def compare(ref, run, q, k, v, do):
  ref_o, ref_vjp = jax.vjp(ref, q, k, v)
  o, vjp = jax.vjp(run, q, k, v)
  ref_g, g = ref_vjp(do), vjp(do)
  errs = [rel(o, ref_o)] + [rel(a, r) for a, r in zip(g, ref_g)]
  finite = all(bool(jnp.isfinite(x).all()) for x in (o, *g))
  return {'fwd': errs[0], 'dq': errs[1], 'dk': errs[2], 'dv': errs[3], 'finite': finite}


def temp_bytes(mesh, t=16384, w=64, d=64):
  """Scratch memory of one device for the gradient of balanced routing over a row of t tokens (K = t / w clusters):
  sharded over `mesh`, and on one device."""
  q = jax.ShapeDtypeStruct((1, t, 1, d), jnp.float32)
  c = jax.ShapeDtypeStruct((1, t // w, d), jnp.float32)
  run = lambda q, c: jnp.sum(sharded.sharded_balanced(q, q, q, c, w, route=q, segment_ids=None, mesh=mesh))
  one = lambda q, c: jnp.sum(ops.balanced(q, q, q, c, w)[0])
  temp = lambda f: jax.jit(jax.grad(f)).lower(q, c).compile().memory_analysis().temp_size_in_bytes
  return {'sharded': temp(run), 'one_device': temp(one), 'row': t * d * 4}


def main():
  devices = jax.devices()
  mesh = lambda data, seq: make_mesh(ml_collections.ConfigDict(
      {'data': data, 'fsdp': 1, 'tensor': 1, 'sequence': seq}), devices[:data * seq])
  m24, m14 = mesh(2, 4), mesh(1, 4)
  out = {
      # w = T / K, the paper's setting: a cluster's members span shards; 3 heads, documents.
      'balanced_seq4_w12_docs': balanced_case(m24, 12, docs=True),
      # w larger than a shard: each shard offers all its tokens as candidates.
      'balanced_seq4_w20': balanced_case(m14, 20, b=1, seed=2),
      'balanced_seq4_ties': balanced_case(m14, 12, b=1, seed=3, repeat=True),
      # Prefix-only membership: windows shorter and longer than a shard, documents.
      'nearest_seq4_w5_docs': nearest_case(m24, 5, docs=True),
      'nearest_seq4_w16': nearest_case(m14, 16, b=1, seed=8),
      'local_seq4_block6_docs': local_case(m24, 6, docs=True),
  }
  out['memory_seq4'] = temp_bytes(m14)
  print(json.dumps(out))


if __name__ == '__main__':
  main()

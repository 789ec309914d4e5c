"""A recurrence that is not affine in its state, handed from device to device over a sharded sequence (whole shards,
and head groups as a wavefront), against one pass over the whole row; prints one JSON line of relative errors."""
import json
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from longctx.parallel import context  # noqa: E402
from longctx.parallel.mesh import make_mesh  # noqa: E402
from tests.helpers.context_attention import rel  # noqa: E402


def form(x, a, state, fresh, ids):
  """s_t = tanh(a_t ⊙ s_{t−1} + x_t) per head, restarting from `fresh` where the document changes; x [B, T, H, D],
  a [B, T, H], state [B, H, D]. Returns (s_t for every t, the last s)."""
  ids = jnp.ones(x.shape[:2], jnp.int32) if ids is None else ids
  starts = jnp.concatenate([jnp.zeros_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)

  def step(s, inputs):
    x_t, a_t, start = inputs
    s = jnp.where(start[:, None, None], fresh['s'], s)
    s = jnp.tanh(a_t[..., None] * s + x_t)
    return s, s

  last, out = jax.lax.scan(step, state['s'], (jnp.moveaxis(x, 1, 0), jnp.moveaxis(a, 1, 0), starts.T))
  return jnp.moveaxis(out, 0, 1), {'s': last}


def main():
  devices = jax.devices()
  b, t, h, d = 2, 48, 4, 3
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  x = jax.random.normal(ks[0], (b, t, h, d))
  a = jax.random.uniform(ks[1], (b, t, h), minval=0.5, maxval=1.5)
  fresh = {'s': jax.random.normal(ks[2], (b, h, d))}
  do = jax.random.normal(ks[3], (b, t, h, d))
  seg = np.ones((b, t), np.int32)
  seg[:, 20:] = 2
  seg[:, 36:] = 3          # a document that starts exactly where a shard starts (4 shards of 12)
  seg = jnp.asarray(seg)

  def ref(x, a, fresh):
    return form(x, a, fresh, fresh, seg)[0]

  ref_o, ref_vjp = jax.vjp(ref, x, a, fresh)
  ref_g = ref_vjp(do)
  out = {}
  for n in (2, 4):
    mesh = make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': n}), devices[:n])
    for lanes in ((1, 4) if n == 2 else (1, 2, 4)):
      run = jax.jit(lambda x, a, fresh, mesh=mesh, lanes=lanes: context.handed_recurrence(
          form, (x, a), fresh, seg, mesh=mesh, lanes=lanes))
      o, vjp = jax.vjp(run, x, a, fresh)
      g = vjp(do)
      out[f'seq{n}_lanes{lanes}'] = {
          'fwd': rel(o, ref_o), 'dx': rel(g[0], ref_g[0]), 'da': rel(g[1], ref_g[1]),
          'dfresh': rel(g[2]['s'], ref_g[2]['s']),
          'finite': all(bool(jnp.isfinite(v).all()) for v in jax.tree.leaves((o, g)))}
  print(json.dumps(out))


if __name__ == '__main__':
  main()

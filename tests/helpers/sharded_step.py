"""Runs two train steps on several meshes of 8 fake CPU devices and prints their distance to the 1-device run."""
import json
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longctx.parallel.mesh import batch_sharding, make_mesh  # noqa: E402
from longctx.train.state import TrainSetup  # noqa: E402
from longctx.train.step import make_train_step  # noqa: E402
from tests.conftest import small_config  # noqa: E402


def run(parallel, devices):
  cfg = small_config(**{'train.batch_size': 8, 'model.num_heads': 4, 'model.num_kv_heads': 2,
                        **{f'parallel.{k}': v for k, v in parallel.items()}})
  mesh = make_mesh(cfg.parallel, devices)
  setup = TrainSetup(cfg, mesh)
  state = setup.init(cfg.seed)
  step = make_train_step(setup)
  rng = np.random.default_rng(0)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  seg = np.repeat([[1] * 20 + [2] * (t - 20)], b, 0)
  pos = np.repeat([list(range(20)) + list(range(t - 20))], b, 0)
  losses = []
  for _ in range(2):
    batch = {'tokens': rng.integers(0, 256, (b, t)), 'segment_ids': seg, 'positions': pos}
    batch = {k: jax.device_put(jnp.asarray(v, jnp.int32), batch_sharding(mesh)) for k, v in batch.items()}
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state['params'])})
  return jax.device_get(state['params']), losses, specs


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  ref, ref_losses, _ = run({'data': 1}, devices[:1])
  out = {}
  for name, parallel in {'data2_fsdp4': {'data': 2, 'fsdp': 4}, 'data2_fsdp2_tensor2': {'data': 2, 'fsdp': 2, 'tensor': 2},
                         'data8': {'data': 8}}.items():
    params, losses, specs = run(parallel, devices)
    out[name] = {'param_rel': float(np.linalg.norm(flat(params) - flat(ref)) / np.linalg.norm(flat(ref))),
                 'loss_diff': max(abs(a - b) for a, b in zip(losses, ref_losses)), 'specs': specs}
  print(json.dumps(out))


if __name__ == '__main__':
  main()

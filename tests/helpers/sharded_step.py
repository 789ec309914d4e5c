"""Runs two train steps on several meshes of 8 fake CPU devices and prints their distance to the 1-device run.

With the argument `linear` (or `titans`): a stack of every linear mixer (or of Titans' LMM, MAG and MAC) and
attention with persistent tokens and a short convolution, on one fsdp × tensor × sequence mesh against one device.
With the argument `routing`: a stack with a routing layer, its centroids seeded from the first batch and moved by
the EMA, on a data × tensor × sequence mesh against one device with the whole batch, with balanced and with
prefix-only membership."""
import json
import os
import sys

os.environ['XLA_FLAGS'] = os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from longctx import data  # noqa: E402
from longctx.parallel.mesh import batch_sharding, make_mesh  # noqa: E402
from longctx.train.state import TrainSetup  # noqa: E402
from longctx.train.step import make_train_step  # noqa: E402
from tests.conftest import small_config  # noqa: E402


ROUTING = {'model.pattern': 'local,routing', 'model.routing.num_clusters': 4, 'model.routing.local_block': 16,
           'model.routing.ema_decay': 0.9, 'model.routing.commitment': 0.1}


MIXERS = {'model.linear.chunk_size': 8, 'model.titans.chunk_size': 4, 'model.titans.segment_size': 8,
          'model.attention.persistent_tokens': 4, 'model.attention.swa_window': 24, 'model.attention.conv_size': 3}
# Two stacks, each compiled on its own (two subprocesses that can run side by side).
STACKS = {'linear': 'hgrn,retnet,gla,hgrn2,deltanet,gated_deltanet,lightning,mamba2,attention',
          'titans': 'titans,titans_mag,titans_mac,attention'}


def run(parallel, devices, overrides=None):
  cfg = small_config(**{'train.batch_size': 8, 'model.num_heads': 4, 'model.num_kv_heads': 2,
                        **{f'parallel.{k}': v for k, v in parallel.items()}, **(overrides or {})})
  mesh = make_mesh(cfg.parallel, devices)
  setup = TrainSetup(cfg, mesh)
  state = setup.init(cfg.seed)
  step = make_train_step(setup)
  rng = np.random.default_rng(0)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  # Half the rows: documents of 20, 12 and the rest, one starting inside a shard, one exactly where a shard starts
  # (t/2); the other half: a document from 20 to 3t/4 that runs across that shard boundary.
  rows = []
  for cuts in ([0, 20, t // 2, t], [0, 20, 3 * t // 4, t]):
    seg_row = np.concatenate([np.full(e - s, i + 1) for i, (s, e) in enumerate(zip(cuts, cuts[1:]))])
    pos_row = np.concatenate([np.arange(e - s) for s, e in zip(cuts, cuts[1:])])
    rows.append((seg_row, pos_row))
  seg = np.stack([rows[i % 2][0] for i in range(b)])
  pos = np.stack([rows[i % 2][1] for i in range(b)])
  losses = []
  for _ in range(2):
    batch = {'tokens': rng.integers(0, 256, (b, t)), 'segment_ids': seg, 'positions': pos}
    if mesh.shape['sequence'] > 1:
      batch = data.balance(batch, mesh.shape['sequence'], cfg.parallel.load_balance)
    batch = {k: jax.device_put(jnp.asarray(v, jnp.int32), batch_sharding(mesh)) for k, v in batch.items()}
    if not losses:
      state = setup.seed_buffers(state, batch, cfg.seed)
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state['params'])})
  return jax.device_get(state['params']), losses, specs, jax.device_get(state.get('buffers', {}))


def replication_checks(devices):
  """Share of parameter bytes left whole on every device under fsdp 4, for sizes the axis divides and for odd ones,
  and what the trainer's check says about the odd ones."""
  from longctx import config as config_lib
  from longctx.parallel.mesh import replication
  from longctx.train.loop import check_replication
  result = {}
  for name, extra in (('even', {}), ('odd', {'model.d_model': 66, 'model.num_heads': 3, 'model.num_kv_heads': 3,
                                           'model.mlp_dim': 130})):
    cfg = small_config(**{'parallel.data': 2, 'parallel.fsdp': 4, 'train.batch_size': 8, **extra})
    setup = TrainSetup(cfg, make_mesh(cfg.parallel, devices))
    result[name] = replication(setup.abstract_params, setup.param_shardings, setup.mesh)['fraction']
    try:
      check_replication(setup, cfg)
      result[f'{name}_check'] = 'passed'
    except config_lib.ConfigError as e:
      result[f'{name}_check'] = e.field
  return result


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def rel(a, b):
  return float(np.linalg.norm(flat(a) - flat(b)) / np.linalg.norm(flat(b)))


def against_one_device(cases, devices):
  """{name: distance of (parallel, devices, overrides) to the one-device run with the same overrides}."""
  out, refs = {}, {}
  for name, (parallel, mesh_devices, overrides) in cases.items():
    key = repr(sorted((overrides or {}).items()))
    if key not in refs:
      refs[key] = run({'data': 1}, devices[:1], overrides)
    ref, ref_losses, _, ref_buffers = refs[key]
    params, losses, specs, buffers = run(parallel, mesh_devices, overrides)
    out[name] = {'param_rel': rel(params, ref), 'loss_diff': max(abs(a - b) for a, b in zip(losses, ref_losses)),
                 'specs': specs}
    if jax.tree.leaves(ref_buffers):
      out[name]['centroid_rel'] = rel(buffers, ref_buffers)
  return out


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  mode = sys.argv[1] if len(sys.argv) > 1 else 'meshes'
  cp = {'data': 2, 'tensor': 2, 'sequence': 2, 'load_balance': 'none'}
  if mode == 'routing':
    cases = {'data2_tensor2_sequence2_balanced': (cp, devices, ROUTING),
             'data2_tensor2_sequence2_causal': (cp, devices, {**ROUTING, 'model.routing.causal': True})}
  elif mode in STACKS:
    stack = {**MIXERS, 'model.pattern': STACKS[mode], 'model.num_layers': len(STACKS[mode].split(','))}
    # The linear stack's attention layer runs balanced (zigzag inside the call); the Titans stack's does not.
    balance = mode == 'linear'
    cases = {'fsdp2_tensor2_sequence2': ({'fsdp': 2, 'tensor': 2, 'sequence': 2, 'load_balance': 'none',
                                          'balance_attention': balance}, devices, stack)}
  else:
    cases = {'data2_fsdp4': ({'data': 2, 'fsdp': 4}, devices, None),
             'data2_fsdp2_tensor2': ({'data': 2, 'fsdp': 2, 'tensor': 2}, devices, None),
             'data2_sequence4_ring': ({'data': 2, 'sequence': 4, 'context': 'ring'}, devices, None),
             'data2_sequence4_all_gather': ({'data': 2, 'sequence': 4, 'context': 'all_gather',
                                             'load_balance': 'striped'}, devices, None),
             'data2_tensor2_sequence2_ring': ({'data': 2, 'tensor': 2, 'sequence': 2}, devices, None),
             # Layers as one scan: stacked weights keep their fsdp and tensor sharding, ring attention in the body;
             # parameters drawn on the host and placed in their shardings.
             'fsdp2_tensor2_sequence2_scanned': ({'fsdp': 2, 'tensor': 2, 'sequence': 2}, devices,
                                                 {'model.scan_layers': True, 'train.init_on': 'host'})}
  out = against_one_device(cases, devices)
  if mode == 'meshes':
    out['replication'] = replication_checks(devices)
  print(json.dumps(out))


if __name__ == '__main__':
  main()

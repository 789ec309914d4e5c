"""longctx-bench / scripts/bench.py: time training steps; write JSON and a markdown table under benchmarks/.

  python scripts/bench.py --suite dense125m                      # a named set of cases (SUITES below)
  python scripts/bench.py --config configs/default.py:size=125m --config.data.seq_len=8192 --name mine

Each case builds the config's train step, compiles it (timed), runs `--warmup` steps, then times `--steps` steps one
by one (each waited for) on fresh random tokens already on the device, and reports the median: step time, tokens/s,
model TFLOP/s and MFU (FLOPs as longctx.train.flops counts them), peak device memory and the attention path taken.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from longctx import config as config_lib
from longctx.cli import common

common.define_config_flag(required=False)
_SUITE = flags.DEFINE_string('suite', '', 'named set of cases: ' + ', '.join(['dense125m', 'tiny']))
_NAME = flags.DEFINE_string('name', 'custom', 'case name when --config is given')
_STEPS = flags.DEFINE_integer('steps', 10, 'timed steps per case')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'untimed steps after compilation')
_OUT = flags.DEFINE_string('out', 'benchmarks', 'directory for the JSON and markdown results')

_DENSE125M = {'data.source': 'random', 'model.tie_embeddings': False, 'train.eval_every': 0}
# (case name, config spec, overrides). The 125M cases match shared/gpu/bare_dense_step.py's model and shapes.
SUITES = {
    'dense125m': [
        ('T2048_B32', 'configs/default.py:size=125m', {**_DENSE125M, 'data.seq_len': 2048, 'train.batch_size': 32}),
        ('T8192_B8', 'configs/default.py:size=125m', {**_DENSE125M, 'data.seq_len': 8192, 'train.batch_size': 8}),
        ('T8192_B8_dots_saveable', 'configs/default.py:size=125m',
         {**_DENSE125M, 'data.seq_len': 8192, 'train.batch_size': 8, 'model.remat': 'dots_saveable'}),
        ('T8192_B16_dots_saveable', 'configs/default.py:size=125m',
         {**_DENSE125M, 'data.seq_len': 8192, 'train.batch_size': 16, 'model.remat': 'dots_saveable'}),
        ('T32768_B2_dots_saveable', 'configs/default.py:size=125m',
         {**_DENSE125M, 'data.seq_len': 32768, 'train.batch_size': 2, 'model.remat': 'dots_saveable'}),
    ],
    'tiny': [
        ('tiny_T256_B16', 'configs/default.py', {'data.source': 'random'}),
    ],
}


def apply_overrides(cfg, overrides: dict):
  for key, value in overrides.items():
    node = cfg
    *parents, leaf = key.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def bench_case(name: str, cfg, steps: int, warmup: int) -> dict:
  from longctx.ops.attention import chosen_paths
  from longctx.parallel.mesh import batch_sharding, make_mesh
  from longctx.train import flops as flops_lib
  from longctx.train.metrics import peak_memory_bytes
  from longctx.train.state import TrainSetup
  from longctx.train.step import make_train_step

  config_lib.validate(cfg, jax.device_count())
  setup = TrainSetup(cfg, make_mesh(cfg.parallel))
  state = setup.init(cfg.seed)
  step = make_train_step(setup)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  sharding = batch_sharding(setup.mesh)
  rng = np.random.default_rng(cfg.seed)

  def batch():
    arrays = {'tokens': rng.integers(0, cfg.model.vocab_size, (b, t)), 'segment_ids': np.ones((b, t)),
              'positions': np.broadcast_to(np.arange(t), (b, t))}
    return {k: jax.device_put(jnp.asarray(v, jnp.int32), sharding) for k, v in arrays.items()}

  batches = [batch() for _ in range(3)]
  start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    state, m = compiled(state, batches[i % 3])
  jax.block_until_ready(state)
  times = []
  for i in range(steps):
    start = time.perf_counter()
    state, m = compiled(state, batches[i % 3])
    jax.block_until_ready(m['loss'])
    times.append(time.perf_counter() - start)
  step_s = statistics.median(times)
  flops = flops_lib.train_flops_per_step(setup)
  peak = flops_lib.peak_flops()
  memory = peak_memory_bytes()
  return {
      'case': name, 'seq_len': t, 'batch_size': b, 'remat': cfg.model.remat, 'dtype': cfg.model.dtype,
      'layers': cfg.model.num_layers, 'd_model': cfg.model.d_model, 'params': setup.param_count(),
      'step_ms': step_s * 1e3, 'step_ms_min': min(times) * 1e3, 'step_ms_max': max(times) * 1e3,
      'tokens_per_s': b * t / step_s, 'model_tflops_per_s': flops / step_s / 1e12,
      'mfu': flops / step_s / (peak * jax.device_count()) if peak else None,
      'peak_memory_gib': memory / 2 ** 30 if memory is not None else None,
      'compile_s': compile_s, 'attention': ','.join(chosen_paths()), 'loss': float(m['loss']),
  }


def environment() -> dict:
  device = jax.devices()[0]
  return {'device': device.device_kind, 'device_count': jax.device_count(), 'platform': device.platform,
          'jax': jax.__version__, 'python': platform.python_version(),
          'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}


def markdown(env: dict, results: list[dict]) -> str:
  head = (f'Device: {env["device"]} ×{env["device_count"]}; jax {env["jax"]}; {env["date"]}\n\n'
          '| case | seq | batch | remat | step ms | tokens/s | TFLOP/s | MFU | peak GiB | attention |\n'
          '|---|---|---|---|---|---|---|---|---|---|\n')
  rows = []
  for r in results:
    if 'error' in r:
      rows.append(f'| {r["case"]} | | | | failed: {r["error"][:80]} | | | | | |')
      continue
    mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '-'
    mem = f'{r["peak_memory_gib"]:.1f}' if r['peak_memory_gib'] is not None else '-'
    rows.append(f'| {r["case"]} | {r["seq_len"]} | {r["batch_size"]} | {r["remat"]} | {r["step_ms"]:.1f} | '
                f'{r["tokens_per_s"]:.0f} | {r["model_tflops_per_s"]:.0f} | {mfu} | {mem} | {r["attention"]} |')
  return head + '\n'.join(rows) + '\n'


def main(argv):
  if len(argv) > 1:
    common.fail(f'unexpected arguments {argv[1:]}', 2)
  common.quiet_library_logs()
  if _SUITE.value:
    if _SUITE.value not in SUITES:
      config_lib.exit_with(config_lib.ConfigError('--suite', _SUITE.value, f'one of {", ".join(SUITES)}'))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cases = [(n, apply_overrides(config_lib.load_file(os.path.join(repo, spec)), o))
             for n, spec, o in SUITES[_SUITE.value]]
    title = _SUITE.value
  elif 'config' in flags.FLAGS and flags.FLAGS['config'].present:
    cases, title = [(_NAME.value, common.load_config(None))], _NAME.value
  else:
    common.fail('give --suite NAME or --config FILE', 2)
  env = environment()
  results = []
  for name, cfg in cases:
    try:
      results.append(bench_case(name, cfg, _STEPS.value, _WARMUP.value))
    except config_lib.ConfigError as e:
      config_lib.exit_with(e)
    except Exception as e:  # an out-of-memory case is a result, not the end of the suite
      logging.warning('case %s failed: %s', name, e)
      results.append({'case': name, 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'})
    print(json.dumps(results[-1]), flush=True)
  os.makedirs(_OUT.value, exist_ok=True)
  stem = os.path.join(_OUT.value, f'{title}-{env["device"].replace(" ", "_")}-{env["date"][:10]}')
  with open(stem + '.json', 'w') as f:
    json.dump({'environment': env, 'results': results}, f, indent=2)
  table = markdown(env, results)
  with open(stem + '.md', 'w') as f:
    f.write(f'# {title}\n\n' + table)
  print(table)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()

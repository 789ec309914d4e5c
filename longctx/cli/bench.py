"""longctx-bench / scripts/bench.py: time training steps; write JSON and a markdown table under benchmarks/.

  python scripts/bench.py --suite dense125m                      # a named set of cases (SUITES below)
  python scripts/bench.py --config configs/default.py:size=125m --config.data.seq_len=8192 --name mine

Each case builds the config's train step, compiles it (timed), runs `--warmup` steps, then times `--steps` steps one
by one (each waited for) on fresh random tokens already on the device, and reports the median: step time, tokens/s,
model TFLOP/s and MFU (FLOPs as longctx.train.flops counts them), peak device memory and the attention path taken.
The layer and kernel suites (--suite attention, linear, state_pass, prep, titans, routing, context) are
longctx/cli/bench_layers.py and bench_linear.py.
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
from longctx.cli import bench_layers, common
from longctx.cli.bench_timing import error_text

common.define_config_flag(required=False)
_SUITE = flags.DEFINE_string('suite', '', 'named set of cases: dense125m, tiny, hybrid340m, attention, linear, '
                             'state_pass, prep, titans, routing, context')
_NAME = flags.DEFINE_string('name', 'custom', 'case name when --config is given')
_STEPS = flags.DEFINE_integer('steps', 10, 'timed steps per case')
_WARMUP = flags.DEFINE_integer('warmup', 2, 'untimed steps after compilation')
_OUT = flags.DEFINE_string('out', 'benchmarks', 'directory for the JSON and markdown results')
_CASES = flags.DEFINE_list('cases', [], 'run only these cases of the suite')
_PROFILE = flags.DEFINE_integer('profile', 0, 'also trace this many steps per case and summarise kernel time')
_MAX_CONTEXT = flags.DEFINE_bool('max-context', False, 'with --config: double data.seq_len from the config\'s until a '
                                 'training step no longer fits, and record the longest that did')
_MAX_CONTEXT_LIMIT = flags.DEFINE_integer('max-context-limit', 1 << 20, 'longest data.seq_len --max-context tries')

_DENSE125M = {'data.source': 'random', 'model.tie_embeddings': False, 'train.eval_every': 0}
_GDN340M = 'configs/hybrid.py:linear=gated_deltanet,ratio=3:1,size=340m'
_HYBRID = {**_DENSE125M, 'model.remat': 'dots_saveable', 'model.scan_layers': True}
# (case name, config spec, overrides). The 125M cases match shared/gpu/bare_dense_step.py's model and shapes.
SUITES = {
    'dense125m': [
        ('T2048_B32', 'configs/default.py:size=125m', {**_DENSE125M, 'data.seq_len': 2048, 'train.batch_size': 32}),
        ('T8192_B8', 'configs/default.py:size=125m', {**_DENSE125M, 'data.seq_len': 8192, 'train.batch_size': 8}),
        ('T8192_B8_packed', 'configs/default.py:size=125m',
         {**_DENSE125M, 'data.source': 'stdlib', 'data.seq_len': 8192, 'train.batch_size': 8}),
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
    # Gated DeltaNet 3:1 hybrid at 340M (24 layers, d 1024) against the dense model of the same shape, 2K to 32K
    # tokens per row at 32K tokens per step, layers scanned; the 8K case once more with the jax state pass and once
    # unrolled.
    'hybrid340m': [
        *((f'gdn3to1_T{t}_B{32768 // t}', _GDN340M, {**_HYBRID, 'data.seq_len': t, 'train.batch_size': 32768 // t})
          for t in (2048, 8192, 32768)),
        ('gdn3to1_T8192_B4_jax_state_pass', _GDN340M,
         {**_HYBRID, 'data.seq_len': 8192, 'train.batch_size': 4, 'model.linear.kernel': 'jax'}),
        ('gdn3to1_T8192_B4_unrolled', _GDN340M,
         {**_HYBRID, 'data.seq_len': 8192, 'train.batch_size': 4, 'model.scan_layers': False}),
        *((f'dense_T{t}_B{32768 // t}', _GDN340M,
           {**_HYBRID, 'model.pattern': 'attention', 'data.seq_len': t, 'train.batch_size': 32768 // t})
          for t in (2048, 8192, 32768)),
    ],
}


def device_memory_limit() -> int | None:
  stats = jax.devices()[0].memory_stats() or {}
  return stats.get('bytes_limit')


def bench_case(name: str, cfg, steps: int, warmup: int, profile_steps: int = 0, out: str = '',
               memory_limit: int | None = None) -> dict:
  """One case (module docstring). With `memory_limit` (bytes per device), a step whose compiled buffers need more
  is refused before it runs (MemoryError)."""
  from longctx.ops import state_pass
  from longctx.ops.attention import chosen_paths
  from longctx.parallel.mesh import batch_sharding, make_mesh
  from longctx.train import flops as flops_lib
  from longctx.train.metrics import peak_memory_bytes
  from longctx.train.state import TrainSetup
  from longctx.train.step import make_train_step

  config_lib.validate(cfg, jax.device_count())
  start = time.perf_counter()
  setup = TrainSetup(cfg, make_mesh(cfg.parallel))
  state = jax.block_until_ready(setup.init(cfg.seed))
  init_s = time.perf_counter() - start
  step = make_train_step(setup)
  b, t = cfg.train.batch_size, cfg.data.seq_len
  sharding = batch_sharding(setup.mesh)
  rng = np.random.default_rng(cfg.seed)

  def batch():
    # Sources that pack documents get rows of up to 8 documents; the others one document a row.
    seg = np.sort(rng.integers(1, 9, (b, t)), axis=1) if setup.uses_segments else np.ones((b, t), np.int64)
    index = np.broadcast_to(np.arange(t), (b, t))
    starts = np.concatenate([np.ones((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    positions = index - np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    arrays = {'tokens': rng.integers(0, cfg.model.vocab_size, (b, t)), 'segment_ids': seg, 'positions': positions}
    if setup.mesh.shape['sequence'] > 1:
      from longctx import data
      arrays = data.balance(arrays, setup.mesh.shape['sequence'], cfg.parallel.load_balance)
    return {k: jax.device_put(jnp.asarray(v, jnp.int32), sharding) for k, v in arrays.items()}

  batches = [batch() for _ in range(3)]
  start = time.perf_counter()
  compiled = step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  analysis = compiled.memory_analysis()
  step_bytes = None
  if analysis is not None:
    step_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
                  - analysis.alias_size_in_bytes)
  if memory_limit and step_bytes and step_bytes > memory_limit:
    raise MemoryError(f'the compiled step needs {step_bytes / 2 ** 30:.1f} GiB per device, '
                      f'{memory_limit / 2 ** 30:.1f} GiB available')
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
  profile = {}
  if profile_steps:
    from longctx.train import profiling
    logdir = os.path.join(out, f'profile-{name}')
    holder = {'state': state}

    def one():
      holder['state'], metrics = compiled(holder['state'], batches[0])
      return metrics['loss']
    profiling.trace(one, profile_steps, logdir)
    state = holder['state']
    profile = profiling.summarize(logdir, profile_steps)
  flops = flops_lib.train_flops_per_step(setup)
  peak = flops_lib.peak_flops()
  memory = peak_memory_bytes()
  return {
      'case': name, 'seq_len': t, 'batch_size': b, 'remat': cfg.model.remat, 'dtype': cfg.model.dtype,
      'layers': cfg.model.num_layers, 'd_model': cfg.model.d_model, 'params': setup.param_count(),
      'step_ms': step_s * 1e3, 'step_ms_min': min(times) * 1e3, 'step_ms_max': max(times) * 1e3,
      'tokens_per_s': b * t / step_s, 'model_tflops_per_s': flops / step_s / 1e12,
      'mfu': flops / step_s / (peak * jax.device_count()) if peak else None,
      'step_memory_gib': step_bytes / 2 ** 30 if step_bytes is not None else None,
      'process_peak_memory_gib': memory / 2 ** 30 if memory is not None else None,
      'init_s': init_s, 'compile_s': compile_s, 'attention': ','.join(chosen_paths()),
      'linear_state_pass': ','.join(state_pass.chosen_paths()), 'loss': float(m['loss']),
      **({'profile': profile} if profile else {}),
  }


LOSS_GROUP_TOKENS = 16384


def max_context(name: str, cfg, steps: int, limit: int) -> list[dict]:
  """Training steps of `cfg` at data.seq_len, twice that, ... until a length fails to compile or run (out of
  memory) or passes `limit`: one row per length tried, the last failing one with its error. Each length is
  compiled first; one whose compiled step needs more than the device's memory is not run; one that fits runs
  `steps` steps (no warm-up: one step that completes is the answer)."""
  import copy
  import gc
  rows = []
  t = cfg.data.seq_len
  while t <= limit:
    # The loss in groups of at most LOSS_GROUP_TOKENS tokens a row: whole logits at these lengths would be most
    # of the memory (a 32K vocabulary at 1M tokens: 128 GiB in fp32).
    chunks = max(cfg.model.get('loss_chunks', 1), t // LOSS_GROUP_TOKENS)
    while t % chunks:
      chunks += 1
    c = config_lib.override(copy.deepcopy(cfg), {'data.seq_len': t, 'model.loss_chunks': chunks})
    try:
      row = {**bench_case(f'{name}_T{t}', c, steps, 0, memory_limit=device_memory_limit()), 'fits': True,
             'loss_chunks': chunks}
    except config_lib.ConfigError:
      raise                  # a config this length does not suit (order, divisibility) is an error, not the answer
    except Exception as e:  # running out of memory is the answer being looked for
      row = {'case': f'{name}_T{t}', 'seq_len': t, 'fits': False, 'error': error_text(e)}
    rows.append(row)
    print(json.dumps(row), flush=True)
    if not row['fits']:
      break
    t *= 2
    jax.clear_caches()
    gc.collect()
  return rows


def max_context_markdown(env: dict, name: str, rows: list[dict]) -> str:
  fits = [r['seq_len'] for r in rows if r['fits']]
  lines = [f'Device: {env["device"]} × {env.get("device_count", 1)}; jax {env["jax"]}; {env["date"]}\n',
           f'Longest context that trains ({name}): **{max(fits) if fits else "none"}** tokens per row'
           f'{" (the limit; longer not tried)" if rows and rows[-1]["fits"] else ""}.\n',
           '| seq_len | fits | step ms | tokens/s | step memory GiB | error |', '|---|---|---|---|---|---|']
  for r in rows:
    if r['fits']:
      lines.append(f'| {r["seq_len"]} | yes | {r["step_ms"]:.1f} | {r["tokens_per_s"]:.0f} | '
                   f'{(r.get("step_memory_gib") or float("nan")):.2f} | |')
    else:
      lines.append(f'| {r["seq_len"]} | no | | | | {r["error"][:80]} |')
  return '\n'.join(lines) + '\n'


def environment() -> dict:
  device = jax.devices()[0]
  return {'device': device.device_kind, 'device_count': jax.device_count(), 'platform': device.platform,
          'jax': jax.__version__, 'python': platform.python_version(),
          'date': datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}


def markdown(env: dict, results: list[dict]) -> str:
  head = (f'Device: {env["device"]} ×{env["device_count"]}; jax {env["jax"]}; {env["date"]}\n\n'
          '| case | seq | batch | remat | step ms | tokens/s | TFLOP/s | MFU | step memory GiB | attention |\n'
          '|---|---|---|---|---|---|---|---|---|---|\n')
  rows = []
  for r in results:
    if 'error' in r:
      rows.append(f'| {r["case"]} | | | | failed: {r["error"][:80]} | | | | | |')
      continue
    mfu = f'{100 * r["mfu"]:.1f}%' if r['mfu'] is not None else '-'
    mem = f'{r["step_memory_gib"]:.1f}' if r['step_memory_gib'] is not None else '-'
    rows.append(f'| {r["case"]} | {r["seq_len"]} | {r["batch_size"]} | {r["remat"]} | {r["step_ms"]:.1f} | '
                f'{r["tokens_per_s"]:.0f} | {r["model_tflops_per_s"]:.0f} | {mfu} | {mem} | {r["attention"]} |')
  return head + '\n'.join(rows) + '\n'


def main(argv):
  if len(argv) > 1:
    common.fail(f'unexpected arguments {argv[1:]}', 2)
  common.quiet_library_logs()
  env = environment()
  if _SUITE.value in bench_layers.SUITES:
    suite, table = bench_layers.SUITES[_SUITE.value]
    try:
      results = suite(_STEPS.value, _PROFILE.value, _OUT.value, _CASES.value)
    except config_lib.ConfigError as e:
      config_lib.exit_with(e)
    write(env, _SUITE.value, results, table(env, results))
    return
  if _SUITE.value:
    if _SUITE.value not in SUITES:
      config_lib.exit_with(config_lib.ConfigError(
          '--suite', _SUITE.value, f'one of {", ".join([*SUITES, *bench_layers.SUITES])}'))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cases = [(n, config_lib.override(config_lib.load_file(os.path.join(repo, spec)), o))
             for n, spec, o in SUITES[_SUITE.value] if not _CASES.value or n in _CASES.value]
    title = _SUITE.value
  elif 'config' in flags.FLAGS and flags.FLAGS['config'].present:
    if _MAX_CONTEXT.value:
      try:
        rows = max_context(_NAME.value, common.load_config(None), _STEPS.value, _MAX_CONTEXT_LIMIT.value)
      except config_lib.ConfigError as e:
        config_lib.exit_with(e)
      write(env, f'max_context-{_NAME.value}', rows, max_context_markdown(env, _NAME.value, rows))
      return
    cases, title = [(_NAME.value, common.load_config(None))], _NAME.value
  else:
    common.fail('give --suite NAME or --config FILE', 2)
  results = []
  for name, cfg in cases:
    try:
      results.append(bench_case(name, cfg, _STEPS.value, _WARMUP.value, _PROFILE.value, _OUT.value))
    except config_lib.ConfigError as e:
      config_lib.exit_with(e)
    except Exception as e:  # an out-of-memory case is a result, not the end of the suite
      logging.warning('case %s failed: %s', name, e)
      results.append({'case': name, 'error': f'{type(e).__name__}: {str(e).splitlines()[0][:300]}'})
    print(json.dumps(results[-1]), flush=True)
  table = markdown(env, results)
  profiled = [r for r in results if r.get('profile', {}).get('by_kind_ms')]
  if profiled:
    table += '\nDevice time per step by kind of kernel (ms), from a jax.profiler trace:\n\n'
    kinds = sorted({k for r in profiled for k in r['profile']['by_kind_ms']})
    table += '| case | total | ' + ' | '.join(kinds) + ' |\n|---|---|' + '---|' * len(kinds) + '\n'
    for r in profiled:
      p = r['profile']
      table += f'| {r["case"]} | {p["device_ms_per_step"]:.1f} | ' + ' | '.join(
          f'{p["by_kind_ms"].get(k, 0):.1f}' for k in kinds) + ' |\n'
  write(env, title, results, table)


def write(env: dict, title: str, results: list[dict], table: str) -> None:
  os.makedirs(_OUT.value, exist_ok=True)
  device = env['device'].replace(' ', '_') + (f'x{env["device_count"]}' if env['device_count'] > 1 else '')
  stem = os.path.join(_OUT.value, f'{title}-{device}-{env["date"][:10]}')
  with open(stem + '.json', 'w') as f:
    json.dump({'environment': env, 'results': results}, f, indent=2)
  with open(stem + '.md', 'w') as f:
    f.write(f'# {title}\n\n' + table)
  print(table)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()

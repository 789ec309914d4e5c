"""longctx-bench / scripts/bench.py: time training steps; write JSON and a markdown table under benchmarks/.

  python scripts/bench.py --suite dense125m                      # a named set of cases (SUITES below)
  python scripts/bench.py --config configs/default.py:size=125m --config.data.seq_len=8192 --name mine

Each case builds the config's train step, compiles it (timed), runs `--warmup` steps, then times `--steps` steps one
by one (each waited for) on fresh random tokens already on the device, and reports the median: step time, tokens/s,
model TFLOP/s and MFU (FLOPs as longctx.train.flops counts them), peak device memory and the attention path taken.
"""
from __future__ import annotations

import datetime
import functools
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
from longctx.layers import registry

common.define_config_flag(required=False)
_SUITE = flags.DEFINE_string('suite', '', 'named set of cases: dense125m, tiny, hybrid340m, attention, linear, '
                             'state_pass, titans, routing')
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
_HYBRID = {**_DENSE125M, 'model.remat': 'dots_saveable'}
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
    # tokens per row at 32K tokens per step; the 8K case once more with the jax state pass.
    'hybrid340m': [
        *((f'gdn3to1_T{t}_B{32768 // t}', _GDN340M, {**_HYBRID, 'data.seq_len': t, 'train.batch_size': 32768 // t})
          for t in (2048, 8192, 32768)),
        ('gdn3to1_T8192_B4_jax_state_pass', _GDN340M,
         {**_HYBRID, 'data.seq_len': 8192, 'train.batch_size': 4, 'model.linear.kernel': 'jax'}),
        *((f'dense_T{t}_B{32768 // t}', _GDN340M,
           {**_HYBRID, 'model.pattern': 'attention', 'data.seq_len': t, 'train.batch_size': 32768 // t})
          for t in (2048, 8192, 32768)),
    ],
}


def median_ms(fn, *args, steps: int) -> float:
  """Median wall time of `fn(*args)` over `steps` calls, each waited for, after one untimed call."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times) * 1e3


def error_text(e: Exception) -> str:
  return f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'


def rel_error(a, b) -> float:
  """‖a − b‖ / ‖b‖ over all elements, a taken to fp32."""
  return float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel()) / jnp.linalg.norm(b.ravel()))


def bench_case(name: str, cfg, steps: int, warmup: int, profile_steps: int = 0, out: str = '') -> dict:
  from longctx.ops import state_pass
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
  analysis = compiled.memory_analysis()
  step_bytes = None
  if analysis is not None:
    step_bytes = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
                  - analysis.alias_size_in_bytes)
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
      'compile_s': compile_s, 'attention': ','.join(chosen_paths()),
      'linear_state_pass': ','.join(state_pass.chosen_paths()), 'loss': float(m['loss']),
      **({'profile': profile} if profile else {}),
  }


def max_context(name: str, cfg, steps: int, limit: int) -> list[dict]:
  """Training steps of `cfg` at data.seq_len, twice that, ... until a length fails to compile or run (out of
  memory) or passes `limit`: one row per length tried, the last failing one with its error."""
  import copy
  import gc
  rows = []
  t = cfg.data.seq_len
  while t <= limit:
    c = config_lib.override(copy.deepcopy(cfg), {'data.seq_len': t})
    try:
      row = {**bench_case(f'{name}_T{t}', c, steps, 1), 'fits': True}
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


def bench_attention(steps: int) -> list[dict]:
  """Each attention path, on single-document and on packed rows (up to 8 documents a row): error against the fp32
  reference (B2 T2048, forward and gradients), then forward and forward+backward time at B4 T8192 H16 D128 bf16.
  FLOPs: causal forward 2·B·H·T²·D whatever the packing, forward+backward 3.5× that (FlashAttention's convention)."""
  from longctx.ops import attention as attn

  def inputs(b, t, h, d, packed):
    ks = jax.random.split(jax.random.PRNGKey(t), 5)
    seg = jnp.sort(jax.random.randint(ks[4], (b, t), 1, 9), axis=1) if packed else None
    return [jax.random.normal(k, (b, t, h, d), jnp.bfloat16) for k in ks[:4]], seg

  def run(impl, seg, q, k, v, do):
    out, vjp = jax.vjp(lambda q, k, v: attn.attention(q, k, v, seg, impl=impl, chunk_size=512), q, k, v)
    return out, vjp(do)

  impls = [i for i in ('cudnn', 'xla', 'chunked') if i != 'cudnn' or jax.default_backend() == 'gpu']
  b, t, h, d = 4, 8192, 16, 128
  fwd_flops = 2 * b * h * t * t * d
  results = []
  for packed in (False, True):
    (q, k, v, do), seg = inputs(2, 2048, 16, 128, packed)
    ref, ref_grads = jax.jit(lambda *a: run('naive', seg, *a))(*(x.astype(jnp.float32) for x in (q, k, v, do)))
    errors = {}
    for impl in impls:
      out, grads = jax.jit(lambda *a, impl=impl: run(impl, seg, *a))(q, k, v, do)
      errors[impl] = {'out': rel_error(out, ref),
                      **{f'd{n}': rel_error(g, r) for n, g, r in zip('qkv', grads, ref_grads)}}
    (q, k, v, do), seg = inputs(b, t, h, d, packed)
    for impl in impls:
      fwd = jax.jit(lambda q, k, v, impl=impl: attn.attention(q, k, v, seg, impl=impl, chunk_size=512))
      both = jax.jit(lambda q, k, v, do, impl=impl: run(impl, seg, q, k, v, do))
      row = {'case': f'attention_{impl}{"_packed" if packed else ""}', 'impl': impl, 'packed': packed,
             'shape': f'B{b} T{t} H{h} D{d} bf16', 'error_vs_fp32': errors[impl]}
      for label, fn, args, mult in (('fwd', fwd, (q, k, v), 1.0), ('fwd_bwd', both, (q, k, v, do), 3.5)):
        try:
          ms = median_ms(fn, *args, steps=steps)
          row[f'{label}_ms'], row[f'{label}_tflops_per_s'] = ms, mult * fwd_flops / ms / 1e9
        except Exception as e:  # e.g. out of memory on the xla path
          row[f'{label}_error'] = error_text(e)
      results.append(row)
      print(json.dumps(row), flush=True)
  return results


def bench_linear(steps: int, profile_steps: int = 0, out: str = '', cases=()) -> list[dict]:
  """The chunked linear-attention forms, forward and forward+backward, B4 T8192 H16 D128 bf16, chunk 64: the shape
  flash-linear-attention is compared at (scripts/peers/fla_linear.py times it in the same device call). The vector
  recurrence (HGRN) runs over the same B×T with H·D = 2048 channels. With `profile_steps`, each forward+backward is
  traced and its device time summarised by kind of kernel."""
  from longctx.ops.channel_decay import chunk_channel_decay, scan_vector_decay
  from longctx.ops.delta_rule import chunk_delta_rule
  from longctx.ops.scalar_decay import chunk_scalar_decay
  from longctx.train import profiling

  b, t, h, d = 4, 8192, 16, 128
  ks = jax.random.split(jax.random.PRNGKey(0), 7)
  q, k, v, do = (jax.random.normal(key, (b, t, h, d), jnp.bfloat16) for key in ks[:4])
  k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(jnp.bfloat16)
  beta = jax.nn.sigmoid(jax.random.normal(ks[4], (b, t, h))).astype(jnp.bfloat16)
  g = -jax.nn.softplus(jax.random.normal(ks[5], (b, t, h))) * 0.1
  gk = jax.nn.log_sigmoid(jax.random.normal(ks[6], (b, t, h, d))) / 16     # GLA's gate range
  flat = lambda x: x.reshape(b, t, h * d)
  # Gates are arguments, not closed-over constants, which XLA would spend seconds constant-folding.
  families = {
      'gated_delta_rule': lambda q, k, v, beta, g, gk, kernel: chunk_delta_rule(q, k, v, beta, g, chunk_size=64,
                                                                                kernel=kernel)[0],
      'delta_rule': lambda q, k, v, beta, g, gk, kernel: chunk_delta_rule(q, k, v, beta, None, chunk_size=64,
                                                                          kernel=kernel)[0],
      'scalar_decay': lambda q, k, v, beta, g, gk, kernel: chunk_scalar_decay(q, k, v, g, chunk_size=64,
                                                                              kernel=kernel)[0],
      'channel_decay': lambda q, k, v, beta, g, gk, kernel: chunk_channel_decay(q, k, v, gk, chunk_size=64,
                                                                                kernel=kernel)[0],
  }
  kernels = ('jax', 'pallas') if jax.default_backend() == 'gpu' else ('jax',)
  forms = {f'{name}_{kernel}': functools.partial(fn, kernel=kernel) for name, fn in families.items()
           for kernel in kernels}
  forms['vector_decay'] = lambda q, k, v, beta, g, gk: scan_vector_decay(flat(v), flat(gk))[0].reshape(b, t, h, d)
  small = tuple(x[:1, :2048] for x in (q, k, v, beta, g, gk, do))
  results = []
  for name, fn in forms.items():
    if cases and name not in cases and name.rsplit('_', 1)[0] not in cases:
      continue
    fwd = jax.jit(fn)
    both = jax.jit(functools.partial(both_of, fn))
    row = {'case': f'linear_{name}', 'shape': f'B{b} T{t} H{h} D{d} bf16, chunk 64'}
    if name != 'vector_decay':
      # Error of the bf16 form against the fp32 jax form, on B1 T2048 of the same inputs.
      ref_fn = functools.partial(families[name.rsplit('_', 1)[0]], kernel='jax')
      f32 = tuple(x.astype(jnp.float32) for x in small)
      ref = jax.jit(lambda *a: (ref_fn(*a[:6]), both_of(ref_fn, *a)))(*f32)
      got = jax.jit(lambda *a: (fn(*a[:6]), both_of(fn, *a)))(*small)
      row['error_vs_fp32_jax'] = {'out': rel_error(got[0], ref[0]),
                                  **{f'd{n}': rel_error(x, y) for n, x, y in zip('qkv', got[1], ref[1])}}
    args = (q, k, v, beta, g, gk)
    for label, f, a in (('fwd', fwd, args), ('fwd_bwd', both, args + (do,))):
      try:
        row[f'{label}_ms'] = median_ms(f, *a, steps=steps)
      except Exception as e:  # out of memory is a result
        row[f'{label}_error'] = error_text(e)
    if profile_steps and 'fwd_bwd_ms' in row:
      logdir = os.path.join(out or '.', 'profile', f'linear_{name}')
      profiling.trace(lambda: both(*args, do), profile_steps, logdir)
      row['profile'] = profiling.summarize(logdir, profile_steps, top=8)
    results.append(row)
    print(json.dumps(row), flush=True)
  return results


def bench_state_pass(steps: int) -> list[dict]:
  """The chunk state pass alone (kernels_pallas.linear) over its GPU launch options, next to the jax scan: delta
  rule operands, B·H 64, T 8192, chunk 64, D 128, fp32; forward and forward+backward, error against the scan."""
  import itertools

  from kernels_pallas.linear import kernel, reference

  bh, t, c, d = 64, 8192, 64, 128
  n = t // c
  ks = jax.random.split(jax.random.PRNGKey(0), 8)
  x = [jax.random.normal(ks[0], (bh, t, d)), 0.1 * jax.random.normal(ks[1], (bh, t, d)),
       jax.random.normal(ks[2], (bh, t, d)), jnp.tril(0.1 * jax.random.normal(ks[3], (bh, n, c, c))).reshape(bh, t, c),
       jax.random.uniform(ks[4], (bh, d, n), minval=0.9, maxval=1.0), jax.random.normal(ks[5], (bh, d, d)),
       0.01 * jax.random.normal(ks[6], (bh, t, d))]
  cot = jax.random.normal(ks[7], (bh, t, d))

  def timed(fn):
    fwd = jax.jit(lambda *a: fn(*a)[0])
    both = jax.jit(lambda *a: jax.grad(lambda *a: jnp.sum(fn(*a)[0] * cot), argnums=tuple(range(len(a))))(*a))
    return fwd, both

  ref_fwd, ref_both = timed(lambda *a: reference.state_pass(*a, chunk=c))
  o_ref, g_ref = ref_fwd(*x), ref_both(*x)
  shape = f'BH{bh} T{t} C{c} D{d} fp32, delta rule'
  results = [{'case': 'state_pass_jax', 'shape': shape, 'fwd_ms': median_ms(ref_fwd, *x, steps=steps),
              'fwd_bwd_ms': median_ms(ref_both, *x, steps=steps)}]
  print(json.dumps(results[0]), flush=True)
  options = itertools.product((32, 64), (4, 8), (1, 2)) if jax.default_backend() == 'gpu' else ()
  for block_v, warps, stages in options:
    fwd, both = timed(functools.partial(kernel.state_pass, chunk=c, block_v=block_v, num_warps=warps,
                                        num_stages=stages))
    row = {'case': 'state_pass_pallas', 'shape': shape, 'block_v': block_v, 'num_warps': warps, 'num_stages': stages}
    try:
      o, g = fwd(*x), both(*x)
      row.update(err_out=rel_error(o, o_ref), err_grad=max(rel_error(a, b) for a, b in zip(g, g_ref)),
                 fwd_ms=median_ms(fwd, *x, steps=steps), fwd_bwd_ms=median_ms(both, *x, steps=steps))
    except Exception as e:  # an option the compiler refuses (e.g. out of shared memory) is a result
      row['error'] = error_text(e)
    results.append(row)
    print(json.dumps(row), flush=True)
  return results


def state_pass_markdown(env: dict, results: list[dict]) -> str:
  lines = [f'Device: {env["device"]}; jax {env["jax"]}; {env["date"]}\n',
           '| form | value block | warps | stages | fwd ms | fwd+bwd ms | rel err out / grads |',
           '|---|---|---|---|---|---|---|']
  for r in results:
    opts = ' | '.join(str(r.get(k, '-')) for k in ('block_v', 'num_warps', 'num_stages'))
    if 'error' in r:
      lines.append(f'| {r["case"]} | {opts} | failed: {r["error"][:60]} | | |')
      continue
    err = f'{r["err_out"]:.1e} / {r["err_grad"]:.1e}' if 'err_out' in r else 'reference'
    lines.append(f'| {r["case"]} | {opts} | {r["fwd_ms"]:.2f} | {r["fwd_bwd_ms"]:.2f} | {err} |')
  return '\n'.join(lines) + '\n'


def both_of(fn, q, k, v, beta, g, gk, do):
  """Gradients of Σ fn(...) · do in q, k, v."""
  return jax.vjp(lambda q, k, v: fn(q, k, v, beta, g, gk), q, k, v)[1](do)


def time_mixer_grad(row: dict, graph, params, x, dy, positions, segments, steps: int):
  """Compiles the gradient of Σ mixer(x) · dy in the mixer's parameters and x, and records in `row` its median time
  (`fwd_bwd_ms`) and the compiled step's own memory (`step_memory_gib`: arguments, outputs, temporaries).
  Returns the compiled function (called as compiled(params, x))."""
  from flax import nnx

  def loss(params, x):
    y, _ = nnx.merge(graph, params)(x, positions=positions, segment_ids=segments)
    return jnp.sum(y.astype(jnp.float32) * dy)

  compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x).compile()
  mem = compiled.memory_analysis()
  if mem is not None:
    row['step_memory_gib'] = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2 ** 30
  row['fwd_bwd_ms'] = median_ms(compiled, params, x, steps=steps)
  return compiled


def bench_titans(steps: int, profile_steps: int = 0, out: str = '', cases=(), small: bool = False) -> list[dict]:
  """The Titans memory mixer (input projections, convolution, gates, the chunk-parallel memory, output gate and
  projection), forward+backward of a scalar loss in the input and every parameter, bf16 activations: dim 1024,
  8 heads × 128, a 2-layer MLP memory ×4, B2 T4096 at chunk 16 and 64 — the shape titans-pytorch's NeuralMemory is
  compared at (scripts/peers/titans_neural_memory.py) — through the default path (`model.titans.kernel` auto) and
  the Pallas kernel (cases ending `_pallas`). Memory is the compiled step's own (arguments, outputs and
  temporaries), the figure that decides what fits. Each kernel row also records its largest relative error against
  the jax form over the output and every gradient, at B1 T1024 in fp32."""
  from flax import nnx

  from longctx.layers.titans import Titans, memory_spec
  from longctx.ops.titans import chunk as titans_chunk
  from longctx.train import profiling

  b, t, dm = (2, 64, 64) if small else (2, 4096, 1024)
  heads, dh = (2, 16) if small else (8, 128)
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

  def config(chunk, kernel, dtype='bfloat16'):
    return config_lib.override(config_lib.load_file(os.path.join(repo, 'configs/titans.py')), {
        'model.d_model': dm, 'model.num_heads': heads, 'model.titans.num_heads': heads,
        'model.titans.head_dim': dh, 'model.titans.chunk_size': chunk, 'model.titans.kernel': kernel,
        'model.dtype': dtype})

  def mixer(chunk, kernel, dtype='bfloat16'):
    return nnx.split(Titans(config(chunk, kernel, dtype), layer_index=0, rngs=nnx.Rngs(0)))

  def error_vs_jax(chunk):
    """Output and gradients of the kernel path against the jax form, fp32, a shorter sequence."""
    tt = min(t, 1024)
    x = jax.random.normal(jax.random.PRNGKey(2), (1, tt, dm), jnp.float32)
    pos = jnp.arange(tt)[None]

    def run(kernel):
      graph, params = mixer(chunk, kernel, 'float32')
      f = lambda p, x: nnx.merge(graph, p)(x, positions=pos, segment_ids=None)[0]
      y, back = jax.vjp(f, params, x)
      return [y] + jax.tree.leaves(back(jnp.cos(y)))

    fast, ref = jax.jit(lambda: run('pallas'))(), jax.jit(lambda: run('jax'))()
    return max(float(rel_error(a, b_)) for a, b_ in zip(fast, ref))

  results = []
  for chunk in (16, 64):
    for kernel in ('auto', 'pallas'):
      name = f'titans_lmm_chunk{chunk}' + ('_pallas' if kernel == 'pallas' else '')
      if cases and name not in cases:
        continue
      graph, params = mixer(chunk, kernel)
      x, dy = (jax.random.normal(key, (b, t, dm), jnp.bfloat16) for key in jax.random.split(jax.random.PRNGKey(1)))
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      row = {'case': name, 'shape': f'B{b} T{t} dim {dm}, {heads}×{dh}, memory 2×4, chunk {chunk}'}
      try:
        compiled = time_mixer_grad(row, graph, params, x, dy, positions, None, steps)
        row['memory_path'] = titans_chunk.choose(kernel, memory_spec(config(chunk, kernel)), chunk, False,
                                                 jax.default_backend())
        if kernel == 'pallas':
          row['max_rel_error_vs_jax'] = error_vs_jax(chunk)
        if profile_steps:
          logdir = os.path.join(out or '.', 'profile', name)
          profiling.trace(lambda: compiled(params, x), profile_steps, logdir)
          row['profile'] = profiling.summarize(logdir, profile_steps, top=8)
      except Exception as e:  # out of memory is a result
        row['error'] = error_text(e)
      results.append(row)
      print(json.dumps(row), flush=True)
  return results


def bench_routing(steps: int, cases=(), lengths=(8192, 16384, 32768), small: bool = False) -> list[dict]:
  """One attention layer, forward+backward of a scalar loss in its input and parameters, bf16, B1, d 1024, 8 heads
  × 128: full causal attention (the `attention` mixer, cuDNN where it applies) against the PG-19 routing layer (2 of
  8 heads routed, K · w = T with w 256, the rest local over blocks of 256) and a layer routing all 8 heads. Memory is
  the compiled step's own (arguments, outputs, temporaries)."""
  from flax import nnx

  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  dm, heads, window = (64, 4, 16) if small else (1024, 8, 256)
  layers = {'attention': ('attention', heads), 'routing_2of8': ('routing', 2), 'routing_8of8': ('routing', heads)}
  results = []
  for t in lengths:
    for kind, (mixer, routed) in layers.items():
      name = f'{kind}_T{t}'
      if cases and name not in cases:
        continue
      cfg = config_lib.override(config_lib.load_file(os.path.join(repo, 'configs/routing.py')), {
          'model.d_model': dm, 'model.num_heads': heads, 'model.num_kv_heads': heads, 'data.seq_len': t,
          'model.routing.heads': routed, 'model.routing.num_clusters': t // window,
          'model.routing.local_block': window})
      graph, state = nnx.split(registry.get(mixer)(cfg, layer_index=0, rngs=nnx.Rngs(0)))
      params = nnx.to_pure_dict(state)
      x, dy = (jax.random.normal(key, (1, t, dm), jnp.bfloat16) for key in jax.random.split(jax.random.PRNGKey(1)))
      row = {'case': name, 'layer': kind, 'seq_len': t, 'shape': f'B1 T{t} d {dm}, {heads} heads'}
      try:
        time_mixer_grad(row, graph, params, x, dy, jnp.arange(t)[None], None, steps)
      except Exception as e:  # out of memory is a result
        row['error'] = error_text(e)
      results.append(row)
      print(json.dumps(row), flush=True)
  return results


def routing_markdown(env: dict, results: list[dict]) -> str:
  lines = [f'Device: {env["device"]}; jax {env["jax"]}; {env["date"]}\n',
           '| T | layer | fwd+bwd ms | step memory GiB | time vs attention |', '|---|---|---|---|---|']
  base = {r['seq_len']: r.get('fwd_bwd_ms') for r in results if r['layer'] == 'attention'}
  for r in results:
    ms = r.get('fwd_bwd_ms')
    ratio = f'{ms / base[r["seq_len"]]:.2f}×' if ms and base.get(r['seq_len']) else '-'
    lines.append(f'| {r["seq_len"]} | {r["layer"]} | {f"{ms:.2f}" if ms else r.get("error", "failed")[:60]} | '
                 f'{r.get("step_memory_gib", float("nan")):.2f} | {ratio} |')
  return '\n'.join(lines) + '\n'


def titans_markdown(env: dict, results: list[dict]) -> str:
  lines = [f'Device: {env["device"]}; jax {env["jax"]}; {env["date"]}\n',
           '| case | shape | memory path | fwd+bwd ms | step memory GiB | max rel err vs jax (fp32, T1024) |',
           '|---|---|---|---|---|---|']
  cell = lambda r, k, f: format(r[k], f) if k in r else r.get('error', 'failed')[:60]
  lines += [f'| {r["case"]} | {r["shape"]} | {r.get("memory_path", "-")} | {cell(r, "fwd_bwd_ms", ".1f")} | '
            f'{cell(r, "step_memory_gib", ".2f")} | {format(r["max_rel_error_vs_jax"], ".1e") if "max_rel_error_vs_jax" in r else "-"} |'
            for r in results]
  return '\n'.join(lines) + '\n' + profile_tables(results)


def linear_markdown(env: dict, results: list[dict]) -> str:
  lines = [f'Device: {env["device"]}; jax {env["jax"]}; {env["date"]}\n',
           '| form | shape | fwd ms | fwd+bwd ms | rel err vs fp32 jax: out / dq / dk / dv (B1 T2048) |',
           '|---|---|---|---|---|']
  cell = lambda r, k: f'{r[k]:.2f}' if k in r else 'failed'
  err = lambda r: ' / '.join(f'{x:.1e}' for x in r['error_vs_fp32_jax'].values()) if 'error_vs_fp32_jax' in r else '-'
  lines += [f'| {r["case"]} | {r["shape"]} | {cell(r, "fwd_ms")} | {cell(r, "fwd_bwd_ms")} | {err(r)} |'
            for r in results]
  return '\n'.join(lines) + '\n' + profile_tables(results)


def profile_tables(results: list[dict]) -> str:
  lines = []
  for r in results:
    if r.get('profile', {}).get('top_kernels_ms'):
      p = r['profile']
      kinds = ', '.join(f'{k} {v:.2f}' for k, v in p['by_kind_ms'].items())
      lines += [f'\n{r["case"]} forward+backward, device ms by kind: {kinds}. Top kernels:\n',
                '| kernel | ms |', '|---|---|']
      lines += [f'| `{n[:90]}` | {ms:.2f} |' for n, ms in p['top_kernels_ms']]
  return '\n'.join(lines) + ('\n' if lines else '')


def attention_markdown(env: dict, results: list[dict]) -> str:
  lines = [f'Device: {env["device"]}; jax {env["jax"]}; {env["date"]}\n',
           '| path | rows | shape | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | rel err out / dq / dk / dv (B2 T2048) |',
           '|---|---|---|---|---|---|---|---|']
  for r in results:
    e = r['error_vs_fp32']
    cell = lambda k: f'{r[k]:.2f}' if k in r else 'failed'
    tf = lambda k: f'{r[k]:.0f}' if k in r else '-'
    lines.append(f'| {r["impl"]} | {"packed" if r["packed"] else "one document"} | {r["shape"]} | {cell("fwd_ms")} | {tf("fwd_tflops_per_s")} | {cell("fwd_bwd_ms")} | '
                 f'{tf("fwd_bwd_tflops_per_s")} | {e["out"]:.1e} / {e["dq"]:.1e} / {e["dk"]:.1e} / {e["dv"]:.1e} |')
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
  if _SUITE.value == 'attention':
    results = bench_attention(_STEPS.value)
    write(env, 'attention', results, attention_markdown(env, results))
    return
  if _SUITE.value == 'linear':
    results = bench_linear(_STEPS.value, _PROFILE.value, _OUT.value, _CASES.value)
    write(env, 'linear', results, linear_markdown(env, results))
    return
  if _SUITE.value == 'state_pass':
    results = bench_state_pass(_STEPS.value)
    write(env, 'state_pass', results, state_pass_markdown(env, results))
    return
  if _SUITE.value == 'titans':
    results = bench_titans(_STEPS.value, _PROFILE.value, _OUT.value, _CASES.value)
    write(env, 'titans', results, titans_markdown(env, results))
    return
  if _SUITE.value == 'routing':
    results = bench_routing(_STEPS.value, _CASES.value)
    write(env, 'routing', results, routing_markdown(env, results))
    return
  if _SUITE.value:
    if _SUITE.value not in SUITES:
      config_lib.exit_with(config_lib.ConfigError(
          '--suite', _SUITE.value, f'one of {", ".join([*SUITES, "attention", "linear", "state_pass", "titans", "routing"])}'))
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cases = [(n, config_lib.override(config_lib.load_file(os.path.join(repo, spec)), o))
             for n, spec, o in SUITES[_SUITE.value] if not _CASES.value or n in _CASES.value]
    title = _SUITE.value
  elif 'config' in flags.FLAGS and flags.FLAGS['config'].present:
    if _MAX_CONTEXT.value:
      rows = max_context(_NAME.value, common.load_config(None), _STEPS.value, _MAX_CONTEXT_LIMIT.value)
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
  stem = os.path.join(_OUT.value, f'{title}-{env["device"].replace(" ", "_")}-{env["date"][:10]}')
  with open(stem + '.json', 'w') as f:
    json.dump({'environment': env, 'results': results}, f, indent=2)
  with open(stem + '.md', 'w') as f:
    f.write(f'# {title}\n\n' + table)
  print(table)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()

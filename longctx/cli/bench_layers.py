"""Layer and kernel benchmarks for scripts/bench.py: the attention paths, the chunked linear forms, the state-pass
kernel, Titans' memory and routing attention. Each suite returns its rows (also printed as JSON lines as they come)
and has a markdown table; `SUITES` maps --suite names to both.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

from longctx import config as config_lib
from longctx.layers import registry


def median_ms(fn, *args, steps: int, back_to_back: int = 1) -> float:
  """Median wall time of one `fn(*args)` over `steps` samples, after one untimed call. A sample issues
  `back_to_back` calls and waits once: above 1 the host's per-call dispatch and wait drop out and the device's
  time remains, launch gaps included (what CUDA-event timers such as triton.testing.do_bench report)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    outs = [fn(*args) for _ in range(back_to_back)]
    jax.block_until_ready(outs)
    times.append((time.perf_counter() - start) / back_to_back)
  return statistics.median(times) * 1e3


def error_text(e: Exception) -> str:
  return f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'


def rel_error(a, b) -> float:
  """‖a − b‖ / ‖b‖ over all elements, a taken to fp32."""
  return float(jnp.linalg.norm((a.astype(jnp.float32) - b).ravel()) / jnp.linalg.norm(b.ravel()))


def timed(row: dict, label: str, fn, *args, steps: int, back_to_back: int = 1) -> float | None:
  """`row[label + '_ms']` = median_ms(fn, *args); a failure (out of memory is a result) goes to
  `row[label + '_error']` and gives None."""
  try:
    row[f'{label}_ms'] = median_ms(fn, *args, steps=steps, back_to_back=back_to_back)
    return row[f'{label}_ms']
  except Exception as e:
    row[f'{label}_error'] = error_text(e)
    return None


@contextlib.contextmanager
def recorded(row: dict, results: list):
  """The block fills `row`; a failure inside it (out of memory, an option the compiler refuses) is a result, kept as
  the row's `error`. The row then joins `results` and is printed as a JSON line."""
  try:
    yield row
  except Exception as e:
    row['error'] = error_text(e)
  results.append(row)
  print(json.dumps(row), flush=True)


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
        ms = timed(row, label, fn, *args, steps=steps)
        if ms is not None:
          row[f'{label}_tflops_per_s'] = mult * fwd_flops / ms / 1e9
      results.append(row)
      print(json.dumps(row), flush=True)
  return results


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
      timed(row, label, f, *a, steps=steps)
      timed(row, f'{label}_back_to_back', f, *a, steps=steps, back_to_back=10)
    if profile_steps and 'fwd_bwd_ms' in row:
      logdir = os.path.join(out or '.', 'profile', f'linear_{name}')
      profiling.trace(lambda: both(*args, do), profile_steps, logdir)
      row['profile'] = profiling.summarize(logdir, profile_steps, top=8)
    results.append(row)
    print(json.dumps(row), flush=True)
  return results


def linear_markdown(env: dict, results: list[dict]) -> str:
  lines = [f'Device: {env["device"]}; jax {env["jax"]}; {env["date"]}\n',
           '| form | shape | fwd ms | fwd+bwd ms | back to back: fwd / fwd+bwd ms | rel err vs fp32 jax: out / dq / dk / '
           'dv (B1 T2048) |', '|---|---|---|---|---|---|']
  cell = lambda r, k: f'{r[k]:.2f}' if k in r else 'failed'
  err = lambda r: ' / '.join(f'{x:.1e}' for x in r['error_vs_fp32_jax'].values()) if 'error_vs_fp32_jax' in r else '-'
  lines += [f'| {r["case"]} | {r["shape"]} | {cell(r, "fwd_ms")} | {cell(r, "fwd_bwd_ms")} | '
            f'{cell(r, "fwd_back_to_back_ms")} / {cell(r, "fwd_bwd_back_to_back_ms")} | {err(r)} |' for r in results]
  return ('\n'.join(lines) + '\n\nfwd, fwd+bwd: each call waited for; back to back: ten calls issued, then one wait '
          '(device time with launch gaps, as triton.testing.do_bench times fla).\n' + profile_tables(results))


def bench_state_pass(steps: int, cases=()) -> list[dict]:
  """The chunk state pass alone (kernels_pallas.linear) over its GPU launch options, next to the jax scan: delta
  rule operands, B·H 64, T 8192, chunk 64, D 128, fp32; forward and forward+backward, error against the scan.
  `cases`: the precisions to run (tf32, bf16; all if empty)."""
  import itertools

  from kernels_pallas.linear import kernel, reference

  unknown = sorted(set(cases) - {'tf32', 'bf16'})
  if unknown:
    raise config_lib.ConfigError('--cases', ','.join(unknown), 'the state_pass suite takes precisions: tf32, bf16')
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
  gpu = jax.default_backend() == 'gpu'
  # fp32 operands (TF32 products), then bf16 operands and products as the delta rule's prep kernel feeds them.
  options = [(o, 'tf32') for o in itertools.product((32, 64), (4, 8), (1, 2))] if gpu else []
  options += [(o, 'bf16') for o in ((16, 2, 1), (16, 4, 1), (32, 2, 1), (32, 4, 1), (32, 4, 2), (64, 4, 1),
                                     (64, 8, 1))] if gpu else []
  for (block_v, warps, stages), precision in options:
    if cases and precision not in cases:
      continue
    fwd, both = timed(functools.partial(kernel.state_pass, chunk=c, block_v=block_v, num_warps=warps,
                                        num_stages=stages, precision=precision))
    args = [a.astype(jnp.bfloat16) if precision != 'tf32' and i in (0, 1, 2, 3, 6) else a for i, a in enumerate(x)]
    with recorded({'case': 'state_pass_pallas', 'shape': shape, 'block_v': block_v, 'num_warps': warps,
                   'num_stages': stages, 'precision': precision}, results) as row:
      o, g = fwd(*args), both(*args)
      row.update(err_out=rel_error(o, o_ref), err_grad=max(rel_error(a, b) for a, b in zip(g, g_ref)),
                 fwd_ms=median_ms(fwd, *args, steps=steps), fwd_bwd_ms=median_ms(both, *args, steps=steps))
  return results


def state_pass_markdown(env: dict, results: list[dict]) -> str:
  lines = [f'Device: {env["device"]}; jax {env["jax"]}; {env["date"]}\n',
           '| form | value block | warps | stages | operands / products | fwd ms | fwd+bwd ms | rel err out / grads |',
           '|---|---|---|---|---|---|---|---|']
  for r in results:
    opts = ' | '.join(str(r.get(k, '-')) for k in ('block_v', 'num_warps', 'num_stages'))
    p = r.get('precision')
    opts += ' | ' + ('-' if p is None else 'fp32 / tf32' if p == 'tf32' else 'bf16 / bf16')
    if 'error' in r:
      lines.append(f'| {r["case"]} | {opts} | failed: {r["error"][:60]} | | |')
      continue
    err = f'{r["err_out"]:.1e} / {r["err_grad"]:.1e}' if 'err_out' in r else 'reference'
    lines.append(f'| {r["case"]} | {opts} | {r["fwd_ms"]:.2f} | {r["fwd_bwd_ms"]:.2f} | {err} |')
  return '\n'.join(lines) + '\n'


def bench_prep(steps: int, cases=()) -> list[dict]:
  """The prep kernels alone (kernels_pallas.linear.prep and .channel_prep) over their launch options, next to the
  jax form of the same operands: delta rule, scalar decay and per-channel decay (GLA's gate range), B4 T8192 H16 D128
  bf16, chunk 64. `prepare` (forward; the delta rule's also storing X, as the training forward does) and
  `gradients` timed separately; error of the operands against the jax form's."""
  from kernels_pallas.linear import channel_prep, prep
  from longctx.ops import kernel_operands
  from longctx.ops.channel_decay import chunk as channel_chunk
  from longctx.ops.delta_rule import chunk as delta_chunk
  from longctx.ops.scalar_decay import chunk as scalar_chunk

  b, t, h, d, c = (4, 8192, 16, 128, 64) if jax.default_backend() == 'gpu' else (1, 128, 2, 32, 32)
  ks = jax.random.split(jax.random.PRNGKey(0), 6)
  q, k, v = (jax.random.normal(key, (b, t, h, d), jnp.bfloat16) for key in ks[:3])
  k = (k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)).astype(jnp.bfloat16)
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  g = -jax.nn.softplus(jax.random.normal(ks[4], (b, t, h))) * 0.1
  gk = jax.nn.log_sigmoid(jax.random.normal(ks[5], (b, t, h, d))) / 16
  interpret = jax.default_backend() != 'gpu'
  opts = kernel_operands.Options(c, d ** -0.5, 'bf16', interpret)
  kw = dict(chunk=c, scale=opts.scale, precision=opts.precision, interpret=interpret)
  shape = f'B{b} T{t} H{h} D{d} bf16, chunk {c}'

  def channel_prepare(q, k, v, beta, g, count, **kw):
    return channel_prep.prepare(q, k, v, g, count, **kw)

  def channel_gradients(q, k, v, beta, g, count, X, cots, **kw):
    return channel_prep.gradients(q, k, v, g, count, cots, **kw)

  # family: (jax form, beta, gates, prepare, gradients, prepare's warps, gradients' warps)
  families = {
      'delta_rule': (delta_chunk._jax_operands, beta, g, prep.prepare, prep.gradients, (2, 4, 8),
                     ((4, 8), (8, 8), (4, 4), (2, 8))),
      'scalar_decay': (scalar_chunk._jax_operands, None, g, prep.prepare, prep.gradients, (2, 4, 8),
                       ((4, 2), (4, 4), (4, 8))),
      'channel_decay': (channel_chunk._jax_operands, None, gk, channel_prepare, channel_gradients, (2, 4, 8),
                        (4, 8, 16)),
  }
  results = []
  for family, (jax_form, beta_in, gates, prepare, gradients, fwd_warps, bwd_warps) in families.items():
    if cases and family not in cases:
      continue
    args = kernel_operands.prep_inputs(q, k, v, beta_in, gates, None, c)
    jax_fwd = jax.jit(jax_form, static_argnums=6)
    want = jax_fwd(*args, opts)
    with recorded({'case': f'prep_{family}_jax_operands', 'shape': shape}, results) as row:
      timed(row, 'fwd', jax_fwd, *args, opts, steps=steps)
    delta = beta_in is not None
    stored = prepare(*args, **kw, **({'store_inverse': True} if delta else {}))
    X = stored[5] if delta else None
    cots = tuple(jax.random.normal(jax.random.PRNGKey(i), o.shape, o.dtype) for i, o in enumerate(stored[:len(want)]))
    for warps in fwd_warps:
      with recorded({'case': f'prep_{family}', 'shape': shape, 'kernel': 'prepare', 'num_warps': warps},
                    results) as row:
        fwd = jax.jit(functools.partial(prepare, **kw, num_warps=warps))
        row['error_vs_jax'] = max(rel_error(a, b.astype(jnp.float32)) for a, b in zip(fwd(*args), want))
        timed(row, 'fwd', fwd, *args, steps=steps)
        if delta:
          timed(row, 'fwd_storing_inverse', jax.jit(functools.partial(prep.prepare, **kw, num_warps=warps,
                                                                      store_inverse=True)), *args, steps=steps)
    for warps in bwd_warps:
      with recorded({'case': f'prep_{family}', 'shape': shape, 'kernel': 'gradients',
                     'num_warps': list(warps) if delta else warps if isinstance(warps, int) else warps[1]},
                    results) as row:
        grad = jax.jit(functools.partial(gradients, **kw, num_warps=warps))
        timed(row, 'bwd', grad, *args, X, cots, steps=steps)
  return results


def prep_markdown(env: dict, results: list[dict]) -> str:
  lines = [f'Device: {env["device"]}; jax {env["jax"]}; {env["date"]}\n',
           '| case | kernel | warps | ms | rel err vs jax operands |', '|---|---|---|---|---|']
  ms = lambda r: ' / '.join(f'{r[k]:.3f}' for k in ('fwd_ms', 'fwd_storing_inverse_ms', 'bwd_ms') if k in r)
  for r in results:
    err = f'{r["error_vs_jax"]:.1e}' if 'error_vs_jax' in r else '-'
    body = f'failed: {r["error"][:60]}' if 'error' in r else ms(r)
    lines.append(f'| {r["case"]} | {r.get("kernel", "jax")} | {r.get("num_warps", "-")} | {body} | {err} |')
  return '\n'.join(lines) + '\n\nThe delta rule\'s `prepare` row gives the forward alone / storing X.\n'


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
      with recorded({'case': name, 'shape': f'B{b} T{t} dim {dm}, {heads}×{dh}, memory 2×4, chunk {chunk}'},
                    results) as row:
        compiled = time_mixer_grad(row, graph, params, x, dy, positions, None, steps)
        row['memory_path'] = titans_chunk.choose(kernel, memory_spec(config(chunk, kernel)), chunk, False,
                                                 jax.default_backend())
        if kernel == 'pallas':
          row['max_rel_error_vs_jax'] = error_vs_jax(chunk)
        if profile_steps:
          logdir = os.path.join(out or '.', 'profile', name)
          profiling.trace(lambda: compiled(params, x), profile_steps, logdir)
          row['profile'] = profiling.summarize(logdir, profile_steps, top=8)
  return results


def titans_markdown(env: dict, results: list[dict]) -> str:
  lines = [f'Device: {env["device"]}; jax {env["jax"]}; {env["date"]}\n',
           '| case | shape | memory path | fwd+bwd ms | step memory GiB | max rel err vs jax (fp32, T1024) |',
           '|---|---|---|---|---|---|']
  cell = lambda r, k, f: format(r[k], f) if k in r else r.get('error', 'failed')[:60]
  lines += [f'| {r["case"]} | {r["shape"]} | {r.get("memory_path", "-")} | {cell(r, "fwd_bwd_ms", ".1f")} | '
            f'{cell(r, "step_memory_gib", ".2f")} | {format(r["max_rel_error_vs_jax"], ".1e") if "max_rel_error_vs_jax" in r else "-"} |'
            for r in results]
  return '\n'.join(lines) + '\n' + profile_tables(results)


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
      with recorded({'case': name, 'layer': kind, 'seq_len': t, 'shape': f'B1 T{t} d {dm}, {heads} heads'},
                    results) as row:
        time_mixer_grad(row, graph, params, x, dy, jnp.arange(t)[None], None, steps)
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


def bench_context(steps: int, lengths=(32768, 65536, 131072, 262144), check_len: int = 8192) -> list[dict]:
  """Context-parallel causal attention over every device on the `sequence` axis (zigzag rows, one document, B1
  H16 D128 bf16) against one device running the whole row on cuDNN: forward+backward time, per-device TFLOP/s
  and per-device efficiency t_one / (n · t_n). Ring runs on cuDNN blocks (and, at the shortest length, on chunked
  XLA blocks); all-gather on chunked XLA blocks. First the sharded paths' error against the one-device cuDNN
  result (output and gradients) at `check_len`."""
  import ml_collections
  from longctx.parallel import context
  from longctx.parallel.mesh import make_mesh

  n = jax.device_count()
  mesh = make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': n}))
  one = make_mesh(ml_collections.ConfigDict({'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 1}), jax.devices()[:1])
  h, d = 16, 128
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, 'sequence'))
  single = jax.sharding.NamedSharding(one, jax.sharding.PartitionSpec())

  def inputs(t, where):
    ks = jax.random.split(jax.random.PRNGKey(t), 4)
    xs = [jax.random.normal(k, (1, t, h, d), jnp.bfloat16) for k in ks]
    return [jax.device_put(x, where) for x in xs]

  def local_grad(q, k, v, do):
    impl = 'cudnn' if jax.default_backend() == 'gpu' else None
    out, vjp = jax.vjp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=impl),
                       q, k, v)
    return out, vjp(do)

  def sharded_grad(method, impl, t):
    pos = jax.device_put(context.reorder(jnp.arange(t)[None], n, 'zigzag'), sharded)

    def f(q, k, v, do):
      out, vjp = jax.vjp(lambda q, k, v: context.context_attention(
          q, k, v, pos, None, mesh=mesh, method=method, order='zigzag', impl=impl, chunk_size=1024), q, k, v)
      return out, vjp(do)
    return jax.jit(f)

  paths = [('ring', 'cudnn'), ('all_gather', 'cudnn'), ('ring', 'chunked'), ('all_gather', 'chunked')]
  results = []
  # Error of each path against one device, at a length every path handles.
  ref_out, ref_grads = jax.jit(local_grad)(*inputs(check_len, single))
  errors = {}
  for method, impl in paths:
    label = f'{method}_{impl}'
    try:
      q, k, v, do = (jax.device_put(context.reorder(x, n, 'zigzag'), sharded) for x in inputs(check_len, single))
      out, grads = sharded_grad(method, impl, check_len)(q, k, v, do)
      back = lambda x: context.restore(jax.device_put(x, single), n, 'zigzag')
      errors[label] = {'out': rel_error(back(out), ref_out.astype(jnp.float32)),
                       **{f'd{c}': rel_error(back(g), r.astype(jnp.float32)) for c, g, r in zip('qkv', grads, ref_grads)}}
    except Exception as e:
      errors[label] = {'error': error_text(e)}
  print(json.dumps({'errors_vs_one_device': errors}), flush=True)
  for t in lengths:
    flops = 3.5 * 2 * h * t * t * d / 2                      # causal forward (half the square) × 3.5 for fwd+bwd
    row = {'case': f'context_T{t}', 'seq_len': t, 'devices': n, 'shape': f'B1 T{t} H{h} D{d} bf16',
           'errors_at': check_len, 'errors': errors}
    with recorded(row, results):
      t1 = timed(row, 'one_device', jax.jit(local_grad), *inputs(t, single), steps=steps)
      for method, impl in paths:
        if impl == 'chunked' and t > lengths[0]:
          continue
        label = f'{method}_{impl}'
        ms = timed(row, label, sharded_grad(method, impl, t), *inputs(t, sharded), steps=steps)
        if ms is not None:
          row[f'{label}_tflops_per_device'] = flops / n / ms / 1e9
          if t1 is not None:
            row[f'{label}_efficiency'] = t1 / (n * ms)
      if t1 is not None:
        row['one_device_tflops'] = flops / t1 / 1e9
  return results


def context_markdown(env: dict, results: list[dict]) -> str:
  n = results[0]['devices'] if results else 1
  errors = results[0]['errors'] if results else {}
  lines = [f'Device: {env["device"]} × {n}; jax {env["jax"]}; {env["date"]}\n',
           f'Causal attention, B1 H16 D128 bf16, one document, zigzag order over {n} devices, forward+backward. '
           'Efficiency: one device\'s time / (devices × sharded time); TFLOP/s per device (causal FLOPs, 3.5× the '
           'forward for forward+backward).\n',
           '| T | one device ms (TFLOP/s) | ring cuDNN ms | ring TFLOP/s/dev | ring eff. | all-gather cuDNN ms | '
           'all-gather eff. | ring chunked ms | all-gather chunked ms |', '|---|---|---|---|---|---|---|---|---|']
  for r in results:
    ms = lambda k: f'{r[k + "_ms"]:.1f}' if k + '_ms' in r else (f'failed: {r[k + "_error"][:40]}'
                                                                  if k + '_error' in r else '-')
    pct = lambda k: f'{100 * r[k]:.0f}%' if k in r else '-'
    one = ms('one_device') + (f' ({r["one_device_tflops"]:.0f})' if 'one_device_tflops' in r else '')
    tf = f'{r["ring_cudnn_tflops_per_device"]:.0f}' if 'ring_cudnn_tflops_per_device' in r else '-'
    lines.append(f'| {r["seq_len"]} | {one} | {ms("ring_cudnn")} | {tf} | {pct("ring_cudnn_efficiency")} | '
                 f'{ms("all_gather_cudnn")} | {pct("all_gather_cudnn_efficiency")} | {ms("ring_chunked")} | '
                 f'{ms("all_gather_chunked")} |')
  lines += ['', f'Relative error against the one-device cuDNN result at T {results[0]["errors_at"] if results else "-"}'
            ' (output / dq / dk / dv):', '']
  for label, e in errors.items():
    lines.append(f'- {label}: ' + (e['error'] if 'error' in e else
                                  ' / '.join(f'{e[k]:.1e}' for k in ('out', 'dq', 'dk', 'dv'))))
  return '\n'.join(lines) + '\n'


# --suite name: (run(steps, profile_steps, out, cases) -> rows, markdown(env, rows) -> table)
SUITES = {
    'attention': (lambda steps, profile, out, cases: bench_attention(steps), attention_markdown),
    'linear': (bench_linear, linear_markdown),
    'state_pass': (lambda steps, profile, out, cases: bench_state_pass(steps, cases), state_pass_markdown),
    'prep': (lambda steps, profile, out, cases: bench_prep(steps, cases), prep_markdown),
    'titans': (bench_titans, titans_markdown),
    'routing': (lambda steps, profile, out, cases: bench_routing(steps, cases), routing_markdown),
    'context': (lambda steps, profile, out, cases: bench_context(steps), context_markdown),
}

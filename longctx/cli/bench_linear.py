"""The chunked linear-attention benchmarks for scripts/bench.py: the families' chunked forms beside
flash-linear-attention (--suite linear), the state-pass kernel's launch options (--suite state_pass) and the prep
kernels' (--suite prep). Each suite returns its rows (also printed as JSON lines as they come) and has a markdown
table.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp

from longctx import config as config_lib

from longctx.cli.bench_timing import both_of, median_ms, profile_tables, recorded, rel_error, timed


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

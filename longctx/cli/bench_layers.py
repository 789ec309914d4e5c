"""Layer and kernel benchmarks for scripts/bench.py: the attention paths, Titans' memory, routing attention and
context parallelism here, the chunked linear forms and their kernels in `bench_linear`. Each suite returns its rows
(also printed as JSON lines as they come) and has a markdown table; `SUITES` maps --suite names to both.
"""
from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp

from longctx import config as config_lib
from longctx.cli.bench_linear import (bench_linear, bench_prep, bench_state_pass, linear_markdown, prep_markdown,
                                      state_pass_markdown)
from longctx.cli.bench_timing import error_text, profile_tables, recorded, rel_error, time_mixer_grad, timed
from longctx.layers import registry


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
  and per-device efficiency t_one / (n · t_n). Ring and all-gather run on cuDNN blocks (and, at the shortest
  length, on chunked XLA blocks); the ring also on rows in natural order, unbalanced and balanced inside the call
  (`balance`). First the sharded paths' error against the one-device cuDNN result (output and
  gradients) at `check_len`."""
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

  def sharded_grad(method, impl, t, rows):
    order = 'zigzag' if rows == 'zigzag' else 'none'
    pos = jax.device_put(context.reorder(jnp.arange(t)[None], n, order), sharded)

    def f(q, k, v, do):
      out, vjp = jax.vjp(lambda q, k, v: context.context_attention(
          q, k, v, pos, None, mesh=mesh, method=method, order=order, impl=impl, chunk_size=1024,
          balance=rows == 'balanced'), q, k, v)
      return out, vjp(do)
    return jax.jit(f)

  # (method, blocks, rows): rows zigzag (reordered by the loader), natural, or natural balanced inside the call.
  paths = [('ring', 'cudnn', 'zigzag'), ('all_gather', 'cudnn', 'zigzag'), ('ring', 'cudnn', 'natural'),
           ('ring', 'cudnn', 'balanced'), ('ring', 'chunked', 'zigzag'), ('all_gather', 'chunked', 'zigzag')]
  label_of = lambda method, impl, rows: f'{method}_{impl}' + ('' if rows == 'zigzag' else f'_{rows}')
  results = []
  # Error of each path against one device, at a length every path handles.
  ref_out, ref_grads = jax.jit(local_grad)(*inputs(check_len, single))
  errors = {}
  for method, impl, rows in paths:
    label = label_of(method, impl, rows)
    order = 'zigzag' if rows == 'zigzag' else 'none'
    try:
      q, k, v, do = (jax.device_put(context.reorder(x, n, order), sharded) for x in inputs(check_len, single))
      out, grads = sharded_grad(method, impl, check_len, rows)(q, k, v, do)
      back = lambda x: context.restore(jax.device_put(x, single), n, order)
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
      for method, impl, rows in paths:
        if impl == 'chunked' and t > lengths[0]:
          continue
        label = label_of(method, impl, rows)
        ms = timed(row, label, sharded_grad(method, impl, t, rows), *inputs(t, sharded), steps=steps)
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
           'Natural: rows in natural order (as hybrids with recurrent layers keep them); balanced: natural rows moved '
           'to zigzag order inside the call and back (`parallel.balance_attention`).\n',
           '| T | one device ms (TFLOP/s) | ring cuDNN ms | ring TFLOP/s/dev | ring eff. | all-gather cuDNN ms | '
           'all-gather eff. | ring natural ms (eff.) | ring balanced ms (eff.) | ring chunked ms | '
           'all-gather chunked ms |', '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in results:
    ms = lambda k: f'{r[k + "_ms"]:.1f}' if k + '_ms' in r else (f'failed: {r[k + "_error"][:40]}'
                                                                  if k + '_error' in r else '-')
    pct = lambda k: f'{100 * r[k]:.0f}%' if k in r else '-'
    one = ms('one_device') + (f' ({r["one_device_tflops"]:.0f})' if 'one_device_tflops' in r else '')
    tf = f'{r["ring_cudnn_tflops_per_device"]:.0f}' if 'ring_cudnn_tflops_per_device' in r else '-'
    lines.append(f'| {r["seq_len"]} | {one} | {ms("ring_cudnn")} | {tf} | {pct("ring_cudnn_efficiency")} | '
                 f'{ms("all_gather_cudnn")} | {pct("all_gather_cudnn_efficiency")} | '
                 f'{ms("ring_cudnn_natural")} ({pct("ring_cudnn_natural_efficiency")}) | '
                 f'{ms("ring_cudnn_balanced")} ({pct("ring_cudnn_balanced_efficiency")}) | {ms("ring_chunked")} | '
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

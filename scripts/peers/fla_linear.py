"""flash-linear-attention 0.6.0's chunked kernels at the shape of `scripts/bench.py --suite linear`, for a same-run
comparison (needs torch, triton and the fla wheels; run in its own process beside the jax suite).

  python scripts/peers/fla_linear.py [--out DIR] [--cases delta_rule,gla]

Each case autotunes its Triton kernels on first use (one to two minutes a case on an H100), so the results file is
rewritten after every case: a run stopped by a time limit keeps the cases it finished.
"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton

# fla's kernel name -> the case name in the results (the longctx family it is compared with).
CASES = {'gated_delta_rule': 'gated_delta_rule', 'delta_rule': 'delta_rule',
         'simple_gla': 'scalar_decay (simple_gla)', 'gla': 'channel_decay (gla)', 'hgrn': 'vector_decay (hgrn)'}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='benchmarks')
  parser.add_argument('--cases', default='', help='comma-separated subset of: ' + ', '.join(CASES))
  args = parser.parse_args()
  from fla.ops.delta_rule import chunk_delta_rule
  from fla.ops.gated_delta_rule import chunk_gated_delta_rule
  from fla.ops.gla import chunk_gla
  from fla.ops.hgrn import chunk_hgrn
  from fla.ops.simple_gla import chunk_simple_gla

  b, t, h, d = 4, 8192, 16, 128
  dev, dt = 'cuda', torch.bfloat16
  q, k, v, do = (torch.randn(b, t, h, d, device=dev, dtype=dt) for _ in range(4))
  k = F.normalize(k.float(), dim=-1).to(dt)
  beta = torch.rand(b, t, h, device=dev, dtype=dt).sigmoid()
  g = -F.softplus(torch.randn(b, t, h, device=dev, dtype=torch.float32)) * 0.1
  gk = F.logsigmoid(torch.randn(b, t, h, d, device=dev, dtype=torch.float32)) / 16
  cases = {
      'gated_delta_rule': lambda q, k, v: chunk_gated_delta_rule(q, k, v, g, beta)[0],
      'delta_rule': lambda q, k, v: chunk_delta_rule(q, k, v, beta)[0],
      'simple_gla': lambda q, k, v: chunk_simple_gla(q, k, v, g)[0],
      'gla': lambda q, k, v: chunk_gla(q, k, v, gk)[0],
      'hgrn': lambda q, k, v: chunk_hgrn(v.reshape(b, t, h * d), gk.reshape(b, t, h * d))[0].reshape(b, t, h, d),
  }
  wanted = [c for c in args.cases.split(',') if c]
  unknown = sorted(set(wanted) - set(CASES))
  if unknown:
    parser.error(f'--cases: unknown {unknown}; allowed: {", ".join(CASES)}')
  rows = []
  os.makedirs(args.out, exist_ok=True)
  for key, name in CASES.items():
    if wanted and key not in wanted:
      continue
    fn = cases[key]
    row = {'case': f'fla_{name}', 'shape': f'B{b} T{t} H{h} D{d} bf16'}
    try:
      row['fwd_ms'] = triton.testing.do_bench(lambda: fn(q, k, v), return_mode='median')
    except Exception as e:  # a kernel that does not run here is a result
      row['fwd_error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
    qr, kr, vr = (x.detach().clone().requires_grad_() for x in (q, k, v))

    def both():
      fn(qr, kr, vr).backward(do)
    try:
      row['fwd_bwd_ms'] = triton.testing.do_bench(both, return_mode='median', grad_to_none=[qr, kr, vr])
    except Exception as e:
      row['fwd_bwd_error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
    rows.append(row)
    print(json.dumps(row), flush=True)
    with open(os.path.join(args.out, 'fla_linear.json'), 'w') as f:
      json.dump({'torch': torch.__version__, 'device': torch.cuda.get_device_name(), 'results': rows}, f, indent=2)


if __name__ == '__main__':
  main()

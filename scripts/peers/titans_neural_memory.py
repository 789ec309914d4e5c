"""titans-pytorch 0.5.5's NeuralMemory at the shape of `scripts/bench.py --suite titans` (dim 1024, 8 heads × 128,
2-layer MLP memory ×4, B2 T4096, bf16 autocast), forward+backward time and peak memory at chunk 16 and 64, for a
same-run comparison (needs torch and the titans-pytorch wheels; run in its own process beside the jax suite).

  python scripts/peers/titans_neural_memory.py [--out DIR]
"""
import argparse
import json
import os

import torch
import triton


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='benchmarks')
  args = parser.parse_args()
  from titans_pytorch import NeuralMemory

  b, t, dim, heads, dh = 2, 4096, 1024, 8, 128
  rows = []
  for chunk in (16, 64):
    row = {'case': f'titans_pytorch_chunk{chunk}', 'shape': f'B{b} T{t} dim {dim}, {heads}×{dh}, memory 2×4'}
    try:
      torch.cuda.empty_cache()
      mem = NeuralMemory(dim=dim, chunk_size=chunk, heads=heads, dim_head=dh,
                         default_model_kwargs=dict(depth=2, expansion_factor=4.)).cuda()
      x = torch.randn(b, t, dim, device='cuda', requires_grad=True)

      def both():
        with torch.autocast('cuda', dtype=torch.bfloat16):
          out, _ = mem(x)
        out.float().square().mean().backward()
      both()
      torch.cuda.synchronize()
      torch.cuda.reset_peak_memory_stats()
      both()
      torch.cuda.synchronize()
      row['peak_gib'] = torch.cuda.max_memory_allocated() / 2 ** 30
      row['fwd_bwd_ms'] = triton.testing.do_bench(both, return_mode='median', grad_to_none=[x])
      del mem, x
    except Exception as e:  # out of memory is a result
      row['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
    rows.append(row)
    print(json.dumps(row), flush=True)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, 'titans_pytorch.json'), 'w') as f:
    json.dump({'torch': torch.__version__, 'device': torch.cuda.get_device_name(), 'results': rows}, f, indent=2)


if __name__ == '__main__':
  main()

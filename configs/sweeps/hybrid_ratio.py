"""The hybrid study's ratio grid ("A Systematic Analysis of Hybrid Linear Attention"): 24-layer stacks at
linear:full 24:0, 24:1, 12:1, 6:1 and 3:1 (attention layers spread over the depth: 0, 1, 2, 3 and 6 of them), on MQAR.

  python scripts/sweep.py --sweep configs/sweeps/hybrid_ratio.py --workdir runs/hybrid_ratio
  python scripts/sweep.py --sweep configs/sweeps/hybrid_ratio.py:scale=small --workdir runs/ratio64

Variants: scale (paper: L 256, N 16, d 128; small: L 64, N 4, d 64, vocab 512, CPU-sized) and linear (the linear mixer; default
hgrn2, the study's recommendation with Gated DeltaNet).
"""
import ml_collections

from longctx.config import ConfigError, parse_variant

SCALES = {
    #        vocab seq_len pairs d_model heads steps batch lr    eval grid
    'paper': (8192, 256, 16, 128, 2, 3000, 64, 1e-3, '256:16,512:64'),
    'small': (512, 64, 4, 64, 2, 1000, 32, 3e-3, '64:4,128:8'),
}


def get_config(arg=None):
  variant = parse_variant(arg, scale='paper', linear='hgrn2')
  if variant.scale not in SCALES:
    raise ConfigError('--sweep variant scale', variant.scale, f'one of {", ".join(SCALES)}')
  vocab, seq_len, pairs, d_model, heads, steps, batch, lr, grid = SCALES[variant.scale]
  c = ml_collections.ConfigDict()
  c.base = f'configs/hybrid.py:size=tiny,linear={variant.linear},preset=study'
  c.grid = ml_collections.ConfigDict({
      'model.hybrid.ratio': ['24:0', '24:1', '12:1', '6:1', '3:1'],
      'seed': [0],
  }, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({
      'model.num_layers': 24, 'data.source': 'mqar', 'model.vocab_size': vocab, 'data.mqar.vocab': vocab, 'data.seq_len': seq_len,
      'data.mqar.num_pairs': pairs, 'model.d_model': d_model, 'model.num_heads': heads, 'model.num_kv_heads': heads,
      'model.mlp_dim': 2 * d_model, 'train.num_steps': steps, 'train.batch_size': batch,
      'train.learning_rate': lr, 'train.warmup_steps': 100, 'train.eval_every': 0, 'train.checkpoint_every': 0,
      'train.progress_bar': False, 'model.linear.chunk_size': min(64, seq_len),
  }, allow_dotted_keys=True)
  c.evals = [f'mqar --grid {grid} --batches 8']
  return c

"""Recall of every mixer on MQAR (Zoology), pure and as a 3:1 hybrid, at one training budget.

  python scripts/sweep.py --sweep configs/sweeps/mqar_mixers.py --workdir runs/mqar          # L 256, N 16, d 128
  python scripts/sweep.py --sweep configs/sweeps/mqar_mixers.py:scale=small --workdir runs/mqar64  # L 64, N 4, d 64, vocab 512

Each mixer fills the linear slot of configs/hybrid.py; 'attention' there gives the softmax-attention baseline.
Pure stacks have Zoology's 2 layers; a 3:1 hybrid needs a group of 4 (three linear layers, one attention layer).
Every run is scored on MQAR at its training (L, N) and at twice the length with more pairs.
"""
import ml_collections

from longctx.config import ConfigError, parse_variant

MIXERS = ['attention', 'hgrn', 'retnet', 'gla', 'hgrn2', 'deltanet', 'gated_deltanet', 'lightning', 'mamba2']
SCALES = {
    #        vocab seq_len pairs d_model heads steps batch lr    eval grid
    'paper': (8192, 256, 16, 128, 2, 3000, 64, 1e-3, '256:16,512:64'),
    'small': (512, 64, 4, 64, 2, 1500, 32, 3e-3, '64:4,128:8'),
}


def get_config(arg=None):
  variant = parse_variant(arg, scale='paper')
  if variant.scale not in SCALES:
    raise ConfigError('--sweep variant scale', variant.scale, f'one of {", ".join(SCALES)}')
  vocab, seq_len, pairs, d_model, heads, steps, batch, lr, grid = SCALES[variant.scale]
  c = ml_collections.ConfigDict()
  c.base = 'configs/hybrid.py:size=tiny'
  c.grid = ml_collections.ConfigDict({
      'model.hybrid.linear': MIXERS,
      'model.hybrid.ratio+model.num_layers': [('1:0', 2), ('3:1', 4)],
  }, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({
      'data.source': 'mqar', 'model.vocab_size': vocab, 'data.mqar.vocab': vocab, 'data.seq_len': seq_len,
      'data.mqar.num_pairs': pairs,
      'model.d_model': d_model, 'model.num_heads': heads, 'model.num_kv_heads': heads, 'model.mlp_dim': 2 * d_model,
      'train.num_steps': steps, 'train.batch_size': batch, 'train.learning_rate': lr, 'train.warmup_steps': 100,
      'train.eval_every': 0, 'train.checkpoint_every': 0, 'train.progress_bar': False,
      'model.linear.chunk_size': min(64, seq_len), 'seed': 0,
  }, allow_dotted_keys=True)
  c.evals = [f'mqar --grid {grid} --batches 8']
  return c

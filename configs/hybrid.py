"""Hybrid linear/full-attention stacks: `configs/hybrid.py:linear=gated_deltanet,ratio=3:1,size=340m`.

Variants: linear (a linear mixer: hgrn, retnet, gla, hgrn2, deltanet, gated_deltanet, lightning, mamba2), ratio ('r:1' = groups of r linear
layers closed by one attention layer; '1:0' = pure linear), attention (attention | swa: sliding window of
model.attention.swa_window tokens), size (tiny | 125m | 340m | 1.3b). Everything else is configs/default.py.
"""
import os

from longctx.config import ConfigError, load_file, parse_variant

SIZES = {
    #       layers d_model heads mlp   vocab  seq_len batch lr
    'tiny': (4, 128, 4, 384, 384, 256, 16, 3e-3),
    '125m': (12, 768, 12, 2048, 32768, 2048, 32, 6e-4),
    '340m': (24, 1024, 16, 2816, 32768, 4096, 16, 3e-4),
    '1.3b': (24, 2048, 16, 5632, 32768, 4096, 16, 2e-4),
}


def get_config(arg=None):
  variant = parse_variant(arg, linear='gated_deltanet', ratio='3:1', attention='attention', size='tiny')
  if variant.size not in SIZES:
    raise ConfigError('--config variant size', variant.size, f'one of {", ".join(SIZES)}')
  base = 'tiny' if variant.size == 'tiny' else '125m'
  c = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), f'default.py:size={base}'))
  layers, d_model, heads, mlp, vocab, seq_len, batch, lr = SIZES[variant.size]
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.num_kv_heads = layers, d_model, heads, heads
  c.model.mlp_dim, c.model.vocab_size = mlp, vocab
  c.data.seq_len, c.train.batch_size, c.train.learning_rate = seq_len, batch, lr
  c.model.pattern = 'hybrid'
  c.model.hybrid.linear = variant.linear
  c.model.hybrid.ratio = variant.ratio
  c.model.hybrid.attention = variant.attention
  return c

"""Hybrid linear/full-attention stacks: `configs/hybrid.py:linear=gated_deltanet,ratio=3:1,size=340m`.

Variants: linear (a linear mixer: hgrn, retnet, gla, hgrn2, deltanet, gated_deltanet, lightning, mamba2), ratio ('r:1' = groups of r linear
layers closed by one attention layer; '1:0' = pure linear), attention (attention | swa: sliding window of
model.attention.swa_window tokens), size (tiny | 125m | 340m | 1.3b), preset:
  study  the hybrid study's grid ("A Systematic Analysis of Hybrid Linear Attention": 24 layers at 24:0, 24:1, 12:1,
         6:1, 3:1): attention layers spread over the depth (model.hybrid.placement = 'spread'), so any ratio fits;
  h1     Gated DeltaNet's H1: `linear` layers alternating with sliding-window attention (window 2048);
  h2     Gated DeltaNet's H2: Mamba2, Gated DeltaNet, sliding-window attention (window 2048), repeated.
Everything else is configs/default.py.
"""
import os

from longctx.config import ConfigError, load_sized, parse_variant

PRESETS = ('', 'study', 'h1', 'h2')

SIZES = {
    #       layers d_model heads mlp   vocab  seq_len batch lr
    'tiny': (4, 128, 4, 384, 384, 256, 16, 3e-3),
    '125m': (12, 768, 12, 2048, 32768, 2048, 32, 6e-4),
    '340m': (24, 1024, 16, 2816, 32768, 4096, 16, 3e-4),
    '1.3b': (24, 2048, 16, 5632, 32768, 4096, 16, 2e-4),
}


def get_config(arg=None):
  variant = parse_variant(arg, linear='gated_deltanet', ratio='3:1', attention='attention', size='tiny', preset='')
  if variant.preset not in PRESETS:
    raise ConfigError('--config variant preset', variant.preset, f'one of {", ".join(p for p in PRESETS if p)}')
  c = load_sized(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'), variant.size, SIZES)
  c.model.pattern = 'hybrid'
  c.model.hybrid.linear = variant.linear
  c.model.hybrid.ratio = variant.ratio
  c.model.hybrid.attention = variant.attention
  if variant.preset == 'study':
    c.model.hybrid.placement = 'spread'
  elif variant.preset == 'h1':
    c.model.hybrid.ratio, c.model.hybrid.attention = '1:1', 'swa'
    c.model.attention.swa_window = min(2048, c.data.seq_len // 2)
  elif variant.preset == 'h2':
    if c.model.num_layers % 3:
      raise ConfigError('--config variant size', variant.size, 'a size whose depth is a multiple of 3 for preset=h2')
    c.model.pattern = ','.join(['mamba2', 'gated_deltanet', 'swa'] * (c.model.num_layers // 3))
    c.model.attention.swa_window = min(2048, c.data.seq_len // 2)
  return c

"""Routing Transformer language models: `configs/routing.py:size=tiny|wikitext|pg19[,attention=routing|full]`.

Every layer is a `local` layer (all heads attend over their block and the one before) except the top `routing_layers`,
which are `routing` layers: `routing_heads` of their heads route by online k-means (K clusters of w tokens,
K · w = sequence length), the rest stay local.
  tiny      4 layers, d 128, byte-level stdlib corpus at T 256: the top 2 layers route 2 of 4 heads (K 4, w 64)
  wikitext  10 layers, d 1024, 16 heads, T 4096: the top 2 layers route 8 of 16 heads (K 16, w 256)
  pg19      the paper's PG-19 model: 22 layers, d 1024, 8 heads, T 8192, routing only in the last layer with
            2 of 8 heads (K 32, w 256)
`attention=full` swaps every layer for full causal attention at the same size (the baseline), and `causal=true`
trains with the prefix-only membership that decoding uses (longctx.layers.routing). wikitext and pg19 expect token
files (`--config.data.source=tokens --config.data.path=...`, vocabulary 32768).
"""
import os

from longctx.config import ConfigError, load_sized, parse_variant

SIZES = {
    #           layers d_model heads mlp   vocab  seq_len batch lr    routing layers, heads, clusters, local block
    'tiny': ((4, 128, 4, 384, 384, 256, 16, 3e-3), (2, 2, 4, 64)),
    'wikitext': ((10, 1024, 16, 4096, 32768, 4096, 8, 3e-4), (2, 8, 16, 256)),
    'pg19': ((22, 1024, 8, 4096, 32768, 8192, 8, 3e-4), (1, 2, 32, 256)),
}


def get_config(arg=None):
  variant = parse_variant(arg, size='tiny', attention='routing', causal=False)
  if variant.size not in SIZES:
    raise ConfigError('--config variant size', variant.size, f'one of {", ".join(SIZES)}')
  if variant.attention not in ('routing', 'full'):
    raise ConfigError('--config variant attention', variant.attention, 'routing or full')
  shape, (routing_layers, heads, clusters, block) = SIZES[variant.size]
  c = load_sized(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'), variant.size,
                 {variant.size: shape})
  layers = c.model.num_layers
  if variant.attention == 'full':
    c.model.pattern = 'attention'
  else:
    c.model.pattern = ','.join(['local'] * (layers - routing_layers) + ['routing'] * routing_layers)
  c.model.routing.heads = heads
  c.model.routing.num_clusters = clusters
  c.model.routing.window = 0                   # seq_len / num_clusters
  c.model.routing.local_block = block
  c.model.routing.causal = bool(variant.causal)
  return c

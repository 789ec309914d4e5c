"""Titans stacks: `configs/titans.py:variant=lmm,size=340m`.

Variants: variant —
  lmm: every layer is the neural long-term memory (`model.pattern = 'titans'`);
  mac: memory as context (`titans_mac`), attention segments of 512 tokens, inner learning rate bound 0.03
       (MAC_MAX_LR below);
  mag: memory as a gate (`titans_mag`), sliding-window attention of 2048 beside the memory;
  mal: memory as a layer, `titans` and `swa` (window 2048) layers alternating;
the last three with 128 persistent tokens in every attention layer (longctx/layers/titans_wirings.py);
  moneta, yaad, memora: Miras memories as the sequence mixer (LMM wiring): Moneta the lp objective (p = 3) with lq
  retention (q = 4), Yaad the Huber objective with a per-token δ and the decay retention, Memora the l2 objective
  with the KL retention (a softmax mirror step per chunk; longctx/ops/titans/memory.py).
size: tiny
(segments, windows and persistent tokens scaled down with it), and the paper's 170m: 12 blocks, d 768, 12 heads;
340m: 24 blocks, d 1024, 16 heads; 760m: 24 blocks, d 1536, 16 heads; 4K context. Memory settings are
`model.titans` (configs/default.py): a 2-layer MLP memory with expansion 4, chunk 16. Everything else is
configs/default.py.
"""
import os

from longctx.config import ConfigError, load_sized, parse_variant

VARIANTS = ('lmm', 'mac', 'mag', 'mal', 'moneta', 'yaad', 'memora')
MIRAS = {
    'moneta': {'objective': 'lp', 'p': 3.0, 'retention': 'lq', 'q': 4.0},
    'yaad': {'objective': 'huber', 'retention': 'l2'},
    'memora': {'objective': 'l2', 'retention': 'kl'},
}
#            persistent tokens, MAC segment, SWA window
WIRING = {'tiny': (4, 64, 64)}
PAPER_WIRING = (128, 512, 2048)
# MAC's memory learns from the attention output, whose tokens start out nearly alike: at θ up to 0.1 the inner steps
# over a chunk add up along one direction and the gradient grows geometrically with the number of segments (28, 270,
# 824 at 3, 4, 5 segments of 64 at size tiny); at 0.03 it stays flat (3.6, 2.9, 3.2) and MQAR trains
# (benchmarks/README.md).
MAC_MAX_LR = 0.03
SIZES = {
    #       layers d_model heads mlp   vocab  seq_len batch lr
    'tiny': (4, 128, 4, 384, 384, 256, 16, 3e-3),
    '170m': (12, 768, 12, 2048, 32768, 4096, 32, 6e-4),
    '340m': (24, 1024, 16, 2816, 32768, 4096, 16, 4e-4),
    '760m': (24, 1536, 16, 4096, 32768, 4096, 16, 3e-4),
}


def get_config(arg=None):
  variant = parse_variant(arg, variant='lmm', size='tiny')
  if variant.variant not in VARIANTS:
    raise ConfigError('--config variant variant', variant.variant, f'one of {", ".join(VARIANTS)}')
  c = load_sized(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'), variant.size, SIZES)
  persistent, segment, window = WIRING.get(variant.size, PAPER_WIRING)
  if variant.variant in ('mac', 'mag', 'mal'):
    c.model.attention.persistent_tokens = persistent
  c.model.titans.update(MIRAS.get(variant.variant, {}))
  c.model.titans.segment_size = segment
  if variant.variant == 'mac':
    c.model.titans.max_lr = MAC_MAX_LR
  c.model.attention.swa_window = window
  c.model.pattern = {
      'lmm': 'titans', 'moneta': 'titans', 'yaad': 'titans', 'memora': 'titans', 'mac': 'titans_mac', 'mag': 'titans_mag',
      'mal': ','.join(['titans', 'swa'] * (c.model.num_layers // 2) + ['titans'] * (c.model.num_layers % 2)),
  }[variant.variant]
  return c

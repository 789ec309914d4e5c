"""The hybrid study's ratio grid ("A Systematic Analysis of Hybrid Linear Attention"): 24-layer stacks at
linear:full 24:0, 24:1, 12:1, 6:1 and 3:1 (attention layers spread over the depth: 0, 1, 2, 3 and 6 of them), on MQAR.

  python scripts/sweep.py --sweep configs/sweeps/hybrid_ratio.py --workdir runs/hybrid_ratio
  python scripts/sweep.py --sweep configs/sweeps/hybrid_ratio.py:scale=small --workdir runs/ratio64

Variants: scale (paper: L 256, N 16, d 128; small: L 64, N 4, d 64, vocab 512, CPU-sized; longctx.eval.mqar), steps,
batch, lr (0: the scale's) and linear (the linear mixer; default hgrn2, the study's recommendation with Gated
DeltaNet).
"""
import ml_collections

from longctx.config import parse_variant
from longctx.eval.mqar import sweep_settings


def get_config(arg=None):
  variant = parse_variant(arg, scale='paper', linear='hgrn2', steps=0, batch=0, lr=0.0)
  fixed, evals = sweep_settings(variant)
  c = ml_collections.ConfigDict()
  c.base = f'configs/hybrid.py:size=tiny,linear={variant.linear},preset=study'
  c.grid = ml_collections.ConfigDict({
      'model.hybrid.ratio': ['24:0', '24:1', '12:1', '6:1', '3:1'],
      'seed': [0],
  }, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({**fixed, 'model.num_layers': 24}, allow_dotted_keys=True)
  c.evals = evals
  return c

"""Recall of Titans' wirings and the Miras memories on MQAR (Zoology), beside softmax and sliding-window attention,
at the hybrid sweep's budget (configs/sweeps/mqar_mixers.py), scored at the training length and beyond it.

  python scripts/sweep.py --sweep configs/sweeps/mqar_titans.py --workdir runs/mqar_titans --runs_per_device 9

Every run is configs/titans.py at size tiny, reshaped to MQAR's 2 layers at d 128 (longctx.eval.mqar's 'paper'
scale, or 'small'): LMM (`titans`), MAC, MAG, MAL (`titans,swa`), the Moneta, Yaad and Memora memories in the LMM
wiring (MAC at configs/titans.py's MAC_MAX_LR inner learning-rate bound, the others at the default), and 2 layers
of full attention or of sliding-window attention alone (the window, 64 tokens, the one MAG and MAL use, covers a
quarter of a training row: what MAG and MAL recall past it the memory holds). Evaluated on fresh
rows at the training point (L 256, N 16), at 2× and 4× the length with the same pairs, and at 2× with 4× the pairs.
Variants scale, steps, batch, lr (0: the scale's own).
"""
import ml_collections

from longctx.config import parse_variant
from longctx.eval.mqar import sweep_settings

#            model.pattern   persistent tokens  objective  retention  inner learning-rate bound
RUNS = [('attention', 0, 'l2', 'l2', 0.1), ('swa', 0, 'l2', 'l2', 0.1),
        ('titans', 0, 'l2', 'l2', 0.1), ('titans_mac', 4, 'l2', 'l2', 0.03), ('titans_mag', 4, 'l2', 'l2', 0.1),
        ('titans,swa', 4, 'l2', 'l2', 0.1),
        ('titans', 0, 'lp', 'lq', 0.1), ('titans', 0, 'huber', 'l2', 0.1), ('titans', 0, 'l2', 'kl', 0.1)]
GRIDS = {'paper': '256:16,512:16,1024:16,512:64', 'small': '64:4,128:4,256:4,128:8'}


def get_config(arg=None):
  variant = parse_variant(arg, scale='paper', steps=0, batch=0, lr=0.0)
  fixed, _ = sweep_settings(variant)
  c = ml_collections.ConfigDict()
  c.base = 'configs/titans.py:size=tiny'
  c.grid = ml_collections.ConfigDict({
      'model.pattern+model.attention.persistent_tokens+model.titans.objective+model.titans.retention'
      '+model.titans.max_lr': RUNS,
  }, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({**fixed, 'model.num_layers': 2, 'seed': 0}, allow_dotted_keys=True)
  c.evals = [f'mqar --grid {GRIDS[variant.scale]} --batches 8']
  return c

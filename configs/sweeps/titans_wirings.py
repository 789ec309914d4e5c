"""Titans' wirings against the dense baseline at equal steps on the byte-level corpus: LMM, MAC, MAG, MAL and
softmax attention, each trained the same number of steps, then scored by loss and single-needle retrieval at the
training length and beyond it.

  python scripts/sweep.py --sweep configs/sweeps/titans_wirings.py --workdir runs/titans          # tiny, 4 layers
  python scripts/sweep.py --sweep configs/sweeps/titans_wirings.py:size=340m --workdir runs/titans340m
  python scripts/sweep.py --sweep configs/sweeps/titans_wirings.py:niah=1.0,scored=answer,batch=128,steps=8000 \
      --workdir runs/titans_niah        # S-NIAH: the wirings learn the retrieval in ~2000 steps (benchmarks/README.md)

Variants: size (configs/titans.py's sizes), steps, batch (0: the size's), niah (data.niah_fraction: that share of
the training rows carry a needle and its question, so that a small model learns the retrieval format it is then
scored on at the training length, 2× and 4×; 0 scores it zero-shot), scored (data.niah_scored: 'answer' puts those
rows' loss on the value's digits alone). Each run is configs/titans.py at that size with
what distinguishes one wiring there — its layer pattern, persistent tokens and inner learning-rate bound, taken from
that file's variant (`model.pattern + model.attention.persistent_tokens + model.titans.max_lr` vary together) — and
the dense baseline is the same stack with attention layers; MAL alternates memory and sliding-window layers.
"""
import os

import ml_collections

from longctx.config import load_file, parse_variant

TITANS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'titans.py')
WIRINGS = ('lmm', 'mac', 'mag', 'mal')


def get_config(arg=None):
  variant = parse_variant(arg, size='tiny', steps=300, batch=0, niah=0.0, scored='text')
  configs = {w: load_file(f'{TITANS}:variant={w},size={variant.size}') for w in WIRINGS}
  seq_len = configs['lmm'].data.seq_len
  wiring = lambda m: (m.pattern, m.attention.persistent_tokens, m.titans.max_lr)
  dense = ('attention', 0, configs['lmm'].model.titans.max_lr)
  c = ml_collections.ConfigDict()
  c.base = f'configs/titans.py:size={variant.size}'
  c.grid = ml_collections.ConfigDict({
      'model.pattern+model.attention.persistent_tokens+model.titans.max_lr': [
          dense] + [wiring(configs[w].model) for w in WIRINGS],
  }, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({
      'data.source': 'stdlib', 'train.num_steps': variant.steps, 'train.eval_every': 0,
      'train.checkpoint_every': 500, 'train.keep': 1, 'train.progress_bar': False, 'seed': 0,
      'data.niah_fraction': variant.niah, 'data.niah_scored': variant.scored,
      **({'train.batch_size': variant.batch} if variant.batch else {}),
  }, allow_dotted_keys=True)
  c.evals = ['perplexity --batches 4', f'niah --lengths {seq_len},{2 * seq_len},{4 * seq_len} --samples 8']
  return c

"""longctx-generate / scripts/generate.py: sample from a run's newest checkpoint.

  python scripts/generate.py --workdir RUN --prompt 'def main(' [--max_new_tokens 200] [--temperature 0.8]
                             [--top_k 50] [--top_p 0.95] [--num_samples 2] [--seed 0]

Byte-level runs take and print text; token runs take and print comma-separated token ids. Temperature 0 decodes
greedily. Generation stops at the end-of-document token.
"""
from __future__ import annotations

import numpy as np
from absl import app, flags

from longctx import config as config_lib
from longctx.cli import common

_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory to sample from')
_PROMPT = flags.DEFINE_string('prompt', '', 'text (byte-level runs) or comma-separated token ids')
_MAX_NEW = flags.DEFINE_integer('max_new_tokens', 200, 'tokens to generate')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.8, 'softmax temperature (0: greedy)')
_TOP_K = flags.DEFINE_integer('top_k', 0, 'sample among the k most likely tokens (0: all)')
_TOP_P = flags.DEFINE_float('top_p', 1.0, 'sample within this much probability mass (1: all)')
_SAMPLES = flags.DEFINE_integer('num_samples', 1, 'independent samples of the same prompt')
_SEED = flags.DEFINE_integer('seed', 0, 'sampling seed')
flags.mark_flag_as_required('workdir')


def prompt_tokens(text: str, byte_level: bool, vocab: int) -> list[int]:
  from longctx.data.sources import BOS
  if byte_level:
    return [BOS] + list(text.encode())
  try:
    ids = [int(x) for x in text.split(',') if x.strip()]
  except ValueError:
    ids = None
  if not ids or not all(0 <= i < vocab for i in ids):
    raise config_lib.ConfigError('--prompt', text, f'comma-separated token ids in [0, {vocab})')
  return ids


def render(tokens, byte_level: bool, eos_id: int) -> str:
  tokens = [int(t) for t in tokens]
  if eos_id in tokens:
    tokens = tokens[:tokens.index(eos_id)]
  if byte_level:
    return bytes(t for t in tokens if t < 256).decode('utf-8', errors='replace')
  return ','.join(map(str, tokens))


def main(argv):
  if len(argv) > 1:
    common.fail(f'unexpected arguments {argv[1:]}', 2)
  common.quiet_library_logs()
  from longctx import data
  from longctx.data.sources import EOS
  from longctx.eval import run as run_lib
  from longctx.generate import sample
  try:
    run = run_lib.load(_WORKDIR.value)
    byte_level = data.is_byte_level(run.config)
    prompt = prompt_tokens(_PROMPT.value, byte_level, run.config.model.vocab_size)
    if _MAX_NEW.value < 1:
      raise config_lib.ConfigError('--max_new_tokens', _MAX_NEW.value, 'a positive count')
  except config_lib.ConfigError as e:
    config_lib.exit_with(e)
  except FileNotFoundError as e:
    common.fail(str(e), 2)
  eos_id = EOS if byte_level else run.config.data.eos_id
  out = sample(run.model(), np.repeat([prompt], _SAMPLES.value, 0), _MAX_NEW.value,
               temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value,
               eos_id=eos_id if eos_id >= 0 else None)
  for i, row in enumerate(out):
    if _SAMPLES.value > 1:
      print(f'--- sample {i}')
    print(_PROMPT.value + ('' if byte_level else ',') + render(row, byte_level, eos_id))


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()

"""longctx-eval / scripts/evaluate.py: validation loss and loss by position of a run's newest checkpoint.

  python scripts/evaluate.py --workdir /tmp/run [--batches 16] [--seq_len 1024]

Writes WORKDIR/eval.json (or --output) and prints a table. --seq_len evaluates at another context length than the
run trained at (how the model extrapolates).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
from absl import app, flags

from longctx import config as config_lib
from longctx import data
from longctx.cli import common
from longctx.eval import perplexity

_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory to evaluate')
_BATCHES = flags.DEFINE_integer('batches', 8, 'validation batches of train.batch_size rows')
_SEQ_LEN = flags.DEFINE_integer('seq_len', 0, 'evaluation context length (0: the training length)')
_OUTPUT = flags.DEFINE_string('output', '', 'JSON path (default WORKDIR/eval.json)')
flags.mark_flag_as_required('workdir')


def evaluate_run(workdir: str, batches: int, seq_len: int = 0) -> dict:
  from longctx.parallel.mesh import batch_sharding, make_mesh
  from longctx.train.checkpoint import restore_params
  from longctx.train.state import TrainSetup
  from longctx.train.step import make_eval_step

  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise config_lib.ConfigError('--workdir', workdir, 'a run directory holding config.json (made by longctx-train)')
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if seq_len:
    config.data.seq_len = seq_len
  config_lib.validate(config, jax.device_count())
  setup = TrainSetup(config, make_mesh(config.parallel))
  params = restore_params(os.path.join(workdir, 'checkpoints'), setup.abstract_state['params'])
  eval_step, buckets = make_eval_step(setup)
  result = perplexity.evaluate(eval_step, buckets, params, perplexity.validation(config, batches),
                               batch_sharding(setup.mesh), data.is_byte_level(config))
  return {'workdir': workdir, 'seq_len': config.data.seq_len, 'batches': batches, **result}


def table(result: dict) -> str:
  lines = [f'validation loss {result["loss"]:.4f}, accuracy {result["accuracy"]:.4f} over {result["tokens"]} '
           f'scored tokens (seq_len {result["seq_len"]})',
           '| positions | tokens | loss | accuracy |', '|---|---|---|---|']
  lines += [f'| {r["positions"]} | {r["tokens"]} | {r["loss"]:.4f} | {r["accuracy"]:.4f} |' if r['loss'] is not None
            else f'| {r["positions"]} | 0 | - | - |' for r in result['by_position']]
  return '\n'.join(lines)


def main(argv):
  if len(argv) > 1:
    common.fail(f'unexpected arguments {argv[1:]}', 2)
  common.quiet_library_logs()
  try:
    result = evaluate_run(_WORKDIR.value, _BATCHES.value, _SEQ_LEN.value)
  except config_lib.ConfigError as e:
    config_lib.exit_with(e)
  except FileNotFoundError as e:
    common.fail(str(e), 2)
  output = _OUTPUT.value or os.path.join(_WORKDIR.value, 'eval.json')
  with open(output, 'w') as f:
    json.dump(result, f, indent=2)
  print(table(result))


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()

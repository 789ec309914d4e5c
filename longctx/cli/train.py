"""longctx-train / scripts/train.py: train a config in a workdir, resuming whatever the workdir holds.

  python scripts/train.py --config configs/default.py --workdir /tmp/run [--config.train.num_steps=500 ...]
"""
from __future__ import annotations

import jax
from absl import app, flags, logging

from longctx import config as config_lib
from longctx.cli import common

common.define_config_flag()
_WORKDIR = flags.DEFINE_string('workdir', None, 'run directory: checkpoints, metrics, TensorBoard logs')
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    common.fail(f'unexpected arguments {argv[1:]}', 2)
  common.quiet_library_logs()
  from longctx.parallel import distributed
  distributed.initialize()
  config = common.load_config(jax.device_count())
  from longctx.train.loop import IncompatibleCheckpoint, TrainingHalted, train
  try:
    final = train(config, _WORKDIR.value)
  except config_lib.ConfigError as e:
    config_lib.exit_with(e)
  except IncompatibleCheckpoint as e:
    common.fail(str(e), 2)
  except TrainingHalted as e:
    common.fail(str(e), 1)
  logging.info('finished at step %d: %s', final['step'], final)


def run():
  app.run(main, flags_parser=common.parse_flags)


if __name__ == '__main__':
  run()

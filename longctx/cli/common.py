"""What the entry points share: the `--config` flag with overrides, and turning bad input into exit code 2."""
from __future__ import annotations

import logging
import sys

from absl import flags
from absl import logging as absl_logging
from ml_collections import config_flags

from longctx import config as config_lib

FLAGS = flags.FLAGS


class _QuietLibraries(logging.Filter):
  """Keeps orbax's per-save INFO lines out of the run log (warnings and errors still pass)."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs():
  absl_logging.get_absl_handler().addFilter(_QuietLibraries())


def define_config_flag(required: bool = True):
  if 'config' not in FLAGS:
    config_flags.DEFINE_config_file('config', None, 'config file, optionally with a variant: file.py:key=value,...',
                                    lock_config=True)
    if required:
      flags.mark_flag_as_required('config')


def _config_error_in(exc: BaseException | None):
  while exc is not None:
    if isinstance(exc, config_lib.ConfigError):
      return exc
    exc = exc.__cause__ or exc.__context__
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports bad config files, variants and overrides in one screen, exit code 2."""
  try:
    return FLAGS(argv)
  except Exception as e:  # absl and ml_collections raise a variety of types for bad flags
    err = _config_error_in(e)
    if err is None:
      err = config_lib.diagnose_override(argv)
    if err is None:
      err = config_lib.ConfigError('command line', ' '.join(argv[1:]), str(e).splitlines()[0] if str(e) else type(e).__name__)
    config_lib.exit_with(err)


def load_config(device_count: int | None):
  """The parsed --config, validated; any problem exits 2 with the field, the value and what is allowed."""
  try:
    cfg = FLAGS.config
    try:
      cfg.keys()
    except Exception as e:  # ml_collections defers a failed load to the first access
      raise config_lib.ConfigError('--config', FLAGS['config'].config_filename,
                                   'a readable Python file defining get_config(arg) '
                                   f'({str(e).splitlines()[-1].strip()})') from None
    config_lib.validate(cfg, device_count)
  except config_lib.ConfigError as e:
    config_lib.exit_with(e)
  return cfg


def fail(message: str, code: int = 1):
  sys.stderr.write(f'longctx: {message}\n')
  raise SystemExit(code)

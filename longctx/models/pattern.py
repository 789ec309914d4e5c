"""`model.pattern` -> one mixer name per layer.

Accepted forms: a single mixer name (every layer), or a comma-separated list of exactly `num_layers` names.
"""
from __future__ import annotations

from typing import Sequence

from longctx.config import ConfigError


def resolve(pattern: str | Sequence[str], num_layers: int) -> list[str]:
  names = [p.strip() for p in (pattern.split(',') if isinstance(pattern, str) else pattern)]
  if any(not n for n in names):
    raise ConfigError('model.pattern', pattern, 'mixer names separated by commas, none empty')
  if len(names) == 1:
    return names * num_layers
  if len(names) != num_layers:
    raise ConfigError('model.pattern', pattern,
                      f'one mixer name for every layer, or a list of model.num_layers={num_layers} names '
                      f'(got {len(names)})')
  return names

"""`model.pattern` -> one mixer name per layer.

Forms:
  'attention'                      one mixer name: every layer
  'gated_deltanet,attention,...'   exactly `num_layers` names
  'hybrid'                         the rule in `model.hybrid`: `linear` layers and `attention` layers (a mixer name:
                                   'attention' or 'swa') in groups of r + 1 for `ratio` 'r:1' (r linear, one
                                   attention), the attention layer `placement` 'last' | 'first' | 'middle' in each
                                   group, or placement = comma-separated attention layer indices (ratio unused).
                                   Placement 'spread' takes the depth's share of attention layers,
                                   round(num_layers / (r + 1)) (at least one), evenly spaced, each closing its span:
                                   ratios that do not divide the depth, as in the hybrid study's 24-layer grid
                                   (24:1, 12:1, 6:1, 3:1 -> 1, 2, 3, 6 attention layers).
                                   Ratio 'r:0' ('1:0', '24:0') is a pure linear stack.
"""
from __future__ import annotations

from typing import Sequence

from longctx.config import ConfigError


def _fitting_ratios(num_layers: int) -> list[str]:
  return ['1:0'] + [f'{g - 1}:1' for g in range(2, num_layers + 1) if num_layers % g == 0]


PLACEMENTS = ('last', 'first', 'middle', 'spread')


def spread_indices(num_layers: int, linear_per_attention: int) -> list[int]:
  count = max(1, int(num_layers / (linear_per_attention + 1) + 0.5))
  return [int((j + 1) * num_layers / count + 0.5) - 1 for j in range(count)]


def hybrid(num_layers: int, linear: str, ratio: str, placement: str, attention: str) -> list[str]:
  if placement not in PLACEMENTS:
    try:
      indices = sorted({int(i) for i in placement.split(',')})
    except ValueError:
      raise ConfigError('model.hybrid.placement', placement,
                        'last, first, middle, spread, or comma-separated attention layer indices') from None
    if indices[0] < 0 or indices[-1] >= num_layers:
      raise ConfigError('model.hybrid.placement', placement, f'layer indices in [0, {num_layers})')
    return [attention if i in indices else linear for i in range(num_layers)]
  r, sep, one = ratio.partition(':')
  if not sep or not r.isdigit() or one not in ('0', '1'):
    raise ConfigError('model.hybrid.ratio', ratio, "'r:1' (r linear layers per attention layer) or 'r:0' (no attention)")
  if one == '0':
    return [linear] * num_layers
  if placement == 'spread':
    indices = spread_indices(num_layers, int(r))
    return [attention if i in indices else linear for i in range(num_layers)]
  group = int(r) + 1
  if num_layers % group:
    raise ConfigError('model.hybrid.ratio', ratio,
                      f'a ratio whose groups divide model.num_layers={num_layers}: '
                      f'{", ".join(_fitting_ratios(num_layers))} (or model.hybrid.placement=spread)')
  at = {'last': group - 1, 'first': 0, 'middle': group // 2}[placement]
  return [attention if i % group == at else linear for i in range(num_layers)]


def resolve(pattern: str | Sequence[str], num_layers: int, rule=None) -> list[str]:
  """The per-layer mixer names; `rule` is `model.hybrid` (needed for pattern 'hybrid')."""
  if pattern == 'hybrid':
    if rule is None:
      raise ConfigError('model.pattern', pattern, 'a config with a model.hybrid section')
    return hybrid(num_layers, rule.linear, rule.ratio, str(rule.placement), rule.attention)
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

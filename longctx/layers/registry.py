"""Mixers by name. A mixer module registers itself with `@register('name')`; configs refer to that name."""
from __future__ import annotations

from typing import Any

from flax import nnx

_MIXERS: dict[str, type] = {}


class Mixer(nnx.Module):
  """A sequence mixer: `Mixer(config, *, layer_index, rngs)`; `__call__(x, *, positions, segment_ids, cache=None)`.

  x is [batch, time, d_model]; the result is `(y, cache)` with y of the same shape. `init_cache(batch, max_len)`
  makes the cache that decoding threads through calls (KV cache, recurrent state); with a cache, calls continue one
  document from where the last stopped. `config` is the whole run config (mixers read `config.model` and their own
  section). `check_config` validates the fields the mixer reads, before
  any compute, raising `longctx.config.ConfigError`.
  """

  # Mixers whose forget gate has a lower bound that rises with depth (HGRN, HGRN2) set this, define
  # `lower_bound_shape(config)`, and take `log_lower_bound=` (the log of the bound, or None for none) in
  # `__call__`; the model owns the bounds (one softmax over all such layers).
  depth_lower_bound = False
  # Under parallel.sequence > 1: whether the mixer has a path over a sharded sequence, and whether that path needs the
  # sequence in its natural order across the shards (parallel.load_balance=none).
  context_parallel = False
  natural_order = False

  @classmethod
  def check_config(cls, config: Any, layer_index: int) -> None:
    del config, layer_index

  @classmethod
  def check_sequence_sharding(cls, config: Any, shards: int) -> None:
    """What the context-parallel path needs beyond `check_config`, with the sequence over `shards` devices."""
    del config, shards


def check_divides_shard(field: str, value: int, config: Any, shards: int) -> None:
  """Refuses `field` = value unless it divides the tokens each of `shards` sequence shards holds."""
  from longctx.config import ConfigError
  tokens = config.data.seq_len // shards
  if tokens % value:
    raise ConfigError(field, value, f'a divisor of the {tokens} tokens each of parallel.sequence={shards} shards holds')

  @classmethod
  def flops(cls, config: Any, seq_len: int) -> float:
    """Forward FLOPs per sequence beyond the parameter matmuls (longctx.train.flops counts those)."""
    del config, seq_len
    return 0.0


def register(name: str):
  def wrap(cls):
    if name in _MIXERS and _MIXERS[name] is not cls:
      raise ValueError(f'mixer {name!r} is registered twice')
    _MIXERS[name] = cls
    cls.mixer_name = name
    return cls
  return wrap


def names() -> list[str]:
  import longctx.layers  # noqa: F401  (registers the built-in mixers)
  return sorted(_MIXERS)


def get(name: str) -> type:
  from longctx.config import ConfigError
  available = names()
  if name not in _MIXERS:
    raise ConfigError('model.pattern', name, f'a mixer name, one of {", ".join(available)}')
  return _MIXERS[name]

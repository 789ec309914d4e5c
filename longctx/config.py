"""Config files, command-line overrides and validation.

A config file is a Python file with `get_config(arg) -> ml_collections.ConfigDict`; `arg` is the text after the
colon in `--config file.py:key=value,...` and names a variant (`parse_variant` reads it). Overrides are
`--config.section.key=value` (ml_collections' config_flags). `validate` checks every field that can be checked
without compute and raises `ConfigError` naming the field, the value and what is allowed; the entry points turn
that into a one-screen message and exit code 2.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
from typing import Any, Iterable

import ml_collections

from longctx.ops.state_pass import KERNELS as LINEAR_KERNELS
from longctx.ops.titans.chunk import KERNELS as TITANS_KERNELS

OPTIMIZERS = ('adamw', 'adam', 'lion', 'sgd')
SCHEDULES = ('cosine', 'linear', 'constant')
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'offload_dots')
NAN_POLICIES = ('halt', 'skip')
INIT_PLACES = ('auto', 'host', 'device')
DTYPES = ('float32', 'bfloat16')
ATTENTION_IMPLS = ('auto', 'cudnn', 'xla', 'chunked', 'naive')
PARALLEL_AXES = ('data', 'fsdp', 'tensor', 'sequence')

# Fields that define the network and its input; a resume that changes one of them is refused. The exceptions
# change how the same function is computed, not which function.
ARCHITECTURE_FIELDS = ('model', 'data.seq_len', 'data.source')
COMPUTE_FIELDS = ('model.remat', 'model.scan_layers', 'model.dtype', 'model.attention.impl',
                  'model.attention.chunk_size', 'model.attention.max_segments', 'model.linear.kernel', 'model.titans.kernel')


class ConfigError(ValueError):
  """A config field holds a value that is not allowed."""

  def __init__(self, field: str, value: Any, allowed: str):
    self.field, self.value, self.allowed = field, value, allowed
    super().__init__(f'{field} = {value!r} is not allowed; {allowed}')

  def report(self) -> str:
    return (f'longctx: invalid configuration\n'
            f'  field:   {self.field}\n'
            f'  value:   {self.value!r}\n'
            f'  allowed: {self.allowed}\n')


def exit_with(err: ConfigError, code: int = 2):
  sys.stderr.write(err.report())
  sys.stderr.flush()
  raise SystemExit(code)


def parse_variant(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Reads `key=value,key=value` into a ConfigDict whose keys must be among `defaults`."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep:
      raise ConfigError('--config variant', item, f'key=value pairs with keys {sorted(defaults)}')
    if key not in defaults:
      raise ConfigError(f'--config variant key {key!r}', value, f'one of {sorted(defaults)}')
    default = defaults[key]
    if isinstance(default, bool):
      out[key] = value.lower() in ('1', 'true', 'yes')
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return ml_collections.ConfigDict(out)


def load_sized(default_path: str, size: str, sizes: dict) -> ml_collections.ConfigDict:
  """configs/default.py resized by a row of `sizes`: (layers, d_model, heads, mlp, vocab, seq_len, batch, lr)."""
  if size not in sizes:
    raise ConfigError('--config variant size', size, f'one of {", ".join(sizes)}')
  c = load_file(f'{default_path}:size={"tiny" if size == "tiny" else "125m"}')
  layers, d_model, heads, mlp, vocab, seq_len, batch, lr = sizes[size]
  c.model.num_layers, c.model.d_model, c.model.num_heads, c.model.num_kv_heads = layers, d_model, heads, heads
  c.model.mlp_dim, c.model.vocab_size = mlp, vocab
  c.data.seq_len, c.train.batch_size, c.train.learning_rate = seq_len, batch, lr
  return c


def override(cfg: ml_collections.ConfigDict, values: dict[str, Any]) -> ml_collections.ConfigDict:
  """Sets dotted keys (`{'train.num_steps': 5}`) in place, as `--config.train.num_steps=5` would."""
  for key, value in values.items():
    *parents, leaf = key.split('.')
    node = cfg
    for p in parents:
      node = node[p]
    node[leaf] = value
  return cfg


def field(cfg: ml_collections.ConfigDict, path: str) -> Any:
  node = cfg
  for part in path.split('.'):
    node = node[part]
  return node


def flatten(cfg: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(cfg, (ml_collections.ConfigDict, dict)):
    out = {}
    for k in cfg.keys():
      out.update(flatten(cfg[k], f'{prefix}{k}.'))
    return out
  return {prefix[:-1]: cfg}


def to_json(cfg: ml_collections.ConfigDict) -> str:
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)


def architecture_changes(saved: dict, new: ml_collections.ConfigDict) -> list[tuple[str, Any, Any]]:
  """Fields under ARCHITECTURE_FIELDS that differ between a saved config (as a dict) and a new one. A field the
  saved config does not have (added to the schema since) is not a change: it holds its default."""
  old_flat = flatten(saved)
  new_flat = flatten(new)
  changes = []
  for key in sorted(set(old_flat) | set(new_flat)):
    if key in COMPUTE_FIELDS or key not in old_flat:
      continue
    if any(key == f or key.startswith(f + '.') for f in ARCHITECTURE_FIELDS):
      a, b = old_flat.get(key), new_flat.get(key)
      if _normalise(a) != _normalise(b):
        changes.append((key, a, b))
  return changes


def _normalise(v):
  return list(v) if isinstance(v, tuple) else v


def _choice(cfg, path: str, allowed: Iterable[str]):
  value = field(cfg, path)
  allowed = tuple(allowed)
  if value not in allowed:
    raise ConfigError(path, value, f'one of {", ".join(allowed)}')


def _positive(cfg, path: str, zero_ok: bool = False):
  value = field(cfg, path)
  if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero_ok):
    raise ConfigError(path, value, 'a number >= 0' if zero_ok else 'a number > 0')


def mesh_shape(parallel: ml_collections.ConfigDict, device_count: int) -> dict[str, int]:
  """Resolves `parallel.{data,fsdp,tensor,sequence}` (one of them may be -1: fill the rest) to sizes."""
  sizes = {a: int(parallel[a]) for a in PARALLEL_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f'parallel.{a}', s, 'a positive mesh size, or -1 to fill the remaining devices')
  if len(fill) > 1:
    raise ConfigError(f'parallel.{fill[1]}', -1, 'at most one mesh axis may be -1')
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if device_count % known:
      raise ConfigError(f'parallel.{fill[0]}', -1,
                        f'the other axes multiply to {known}, which does not divide the {device_count} devices')
    sizes[fill[0]] = device_count // known
  if math.prod(sizes.values()) != device_count:
    raise ConfigError('parallel', {a: sizes[a] for a in PARALLEL_AXES},
                      f'mesh sizes whose product equals the device count ({device_count})')
  return sizes


def validate(cfg: ml_collections.ConfigDict, device_count: int | None = None) -> None:
  """Checks everything that can be checked before compute; raises ConfigError on the first problem."""
  from longctx import data as data_lib  # imported here: data imports config
  from longctx.models import pattern as pattern_lib

  m, t, d = cfg.model, cfg.train, cfg.data
  for path in ('model.num_layers', 'model.d_model', 'model.num_heads', 'model.num_kv_heads', 'model.mlp_dim',
               'model.vocab_size', 'data.seq_len', 'train.batch_size', 'train.num_steps', 'train.grad_accum'):
    _positive(cfg, path)
  _positive(cfg, 'train.learning_rate', zero_ok=True)
  for path in ('train.checkpoint_every', 'train.eval_every', 'train.log_every', 'train.warmup_steps'):
    _positive(cfg, path, zero_ok=True)
  head_dim = m.head_dim or (m.d_model // m.num_heads)
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError('model.num_heads', m.num_heads, f'a divisor of model.d_model={m.d_model} (or set model.head_dim)')
  if m.num_heads % m.num_kv_heads:
    raise ConfigError('model.num_kv_heads', m.num_kv_heads, f'a divisor of model.num_heads={m.num_heads}')
  if head_dim % 2:
    raise ConfigError('model.head_dim', head_dim, 'an even number (rotary embeddings rotate pairs)')
  _choice(cfg, 'model.dtype', DTYPES)
  _choice(cfg, 'model.param_dtype', DTYPES)
  _choice(cfg, 'model.remat', REMAT_POLICIES)
  if not isinstance(m.get('scan_layers', False), bool):
    raise ConfigError('model.scan_layers', m.scan_layers, 'true or false')
  _choice(cfg, 'model.attention.impl', ATTENTION_IMPLS)
  _choice(cfg, 'model.linear.kernel', LINEAR_KERNELS)
  _choice(cfg, 'model.titans.kernel', TITANS_KERNELS)
  if m.attention.window < 0:
    raise ConfigError('model.attention.window', m.attention.window, '0 (full causal) or a positive window')
  chunk = m.attention.chunk_size
  if chunk <= 0 or (d.seq_len > chunk and d.seq_len % chunk):
    raise ConfigError('data.seq_len', d.seq_len,
                      f'a multiple of model.attention.chunk_size={chunk} (or at most that size)')
  loss_chunks = m.get('loss_chunks', 1)
  if loss_chunks < 1 or d.seq_len % loss_chunks:
    raise ConfigError('model.loss_chunks', loss_chunks, f'a positive divisor of data.seq_len={d.seq_len}')
  _choice(cfg, 'train.optimizer', OPTIMIZERS)
  _choice(cfg, 'train.schedule', SCHEDULES)
  _choice(cfg, 'train.nan_policy', NAN_POLICIES)
  if t.get('init_on') is not None:
    _choice(cfg, 'train.init_on', INIT_PLACES)
  if t.warmup_steps > t.num_steps:
    raise ConfigError('train.warmup_steps', t.warmup_steps, f'at most train.num_steps={t.num_steps}')
  if t.batch_size % t.grad_accum:
    raise ConfigError('train.grad_accum', t.grad_accum, f'a divisor of train.batch_size={t.batch_size}')

  layers = pattern_lib.resolve(m.pattern, m.num_layers, m.get('hybrid'))
  from longctx.layers import registry
  for i, name in enumerate(layers):
    registry.get(name).check_config(cfg, layer_index=i)

  data_lib.check_config(cfg)
  if m.vocab_size < data_lib.vocab_size(cfg):
    raise ConfigError('model.vocab_size', m.vocab_size,
                      f'at least {data_lib.vocab_size(cfg)}, the vocabulary of data.source={d.source!r}')

  if device_count is not None:
    sizes = mesh_shape(cfg.parallel, device_count)
    batch_shards = sizes['data'] * sizes['fsdp']
    micro = t.batch_size // t.grad_accum
    if micro % batch_shards:
      raise ConfigError('train.batch_size', t.batch_size,
                        f'a multiple of parallel.data*parallel.fsdp={batch_shards} per microbatch '
                        f'(train.grad_accum={t.grad_accum})')
    if d.seq_len % sizes['sequence']:
      raise ConfigError('data.seq_len', d.seq_len, f'a multiple of parallel.sequence={sizes["sequence"]}')
    if sizes['sequence'] > 1:
      _check_context_parallel(cfg, layers, sizes['sequence'])
    for name, size in (('num_heads', m.num_heads), ('num_kv_heads', m.num_kv_heads), ('mlp_dim', m.mlp_dim)):
      if size % sizes['tensor']:
        raise ConfigError(f'model.{name}', size, f'a multiple of parallel.tensor={sizes["tensor"]}')


def _check_context_parallel(cfg, layers, n: int) -> None:
  """parallel.sequence = n > 1: every layer needs a context-parallel path and the row must split evenly."""
  from longctx.layers import registry
  from longctx.parallel.context import ORDERS
  p, seq_len = cfg.parallel, cfg.data.seq_len
  if p.get('context', 'ring') not in ('ring', 'all_gather'):
    raise ConfigError('parallel.context', p.context, 'ring or all_gather')
  order = p.get('load_balance', 'zigzag')
  if order not in ORDERS:
    raise ConfigError('parallel.load_balance', order, f'one of {", ".join(ORDERS)}')
  if not isinstance(p.get('balance_attention', False), bool):
    raise ConfigError('parallel.balance_attention', p.balance_attention, 'true or false')
  chunks = 2 * n if order == 'zigzag' else n
  if seq_len % chunks:
    raise ConfigError('data.seq_len', seq_len, f'a multiple of {chunks} for parallel.load_balance={order} over '
                      f'parallel.sequence={n}')
  supported = sorted(name for name in registry.names() if registry.get(name).context_parallel)
  for name in layers:
    if not registry.get(name).context_parallel:
      raise ConfigError('model.pattern', name, f'mixers with a context-parallel path under parallel.sequence={n}: '
                        f'{", ".join(supported)}')
  in_order = sorted({name for name in layers if registry.get(name).natural_order})
  if in_order and order != 'none':
    raise ConfigError('parallel.load_balance', order, f'none: the layers {", ".join(in_order)} need the sequence in '
                      'its natural order across the shards (recurrent state passed along it, or blocks and clusters '
                      'at their positions)')
  for name in sorted(set(layers)):
    registry.get(name).check_sequence_sharding(cfg, n)
  a = cfg.model.attention
  if a.impl == 'cudnn' and {'attention', 'swa'} & set(layers):
    from longctx import data as data_lib
    blockers = [why for why, present in (
        (f'parallel.load_balance={order} (zigzag or none only)', order == 'striped'),
        ('swa layers (no window)', 'swa' in layers),
        (f'rows that pack several documents (data.source={cfg.data.source!r})',
         data_lib.rows_hold_several_documents(cfg))) if present]
    if blockers:
      raise ConfigError('model.attention.impl', a.impl, f'auto or chunked under parallel.sequence={n} with '
                        f'{", ".join(blockers)}: cuDNN blocks need order zigzag or none, no window and one '
                        'document a row')
  if a.get('conv_size', 0) and order != 'none':
    raise ConfigError('model.attention.conv_size', a.conv_size, f'0 under parallel.load_balance={order}: the short '
                      'convolution reads the tokens before each one in the natural order (parallel.load_balance=none '
                      'keeps it)')


_OVERRIDE = re.compile(r'^--config\.([\w.]+)(?:=(.*))?$')


def load_file(spec: str) -> ml_collections.ConfigDict:
  """`path.py[:variant]` -> get_config(variant), as `--config` loads it."""
  path, _, arg = spec.partition(':')
  module_spec = importlib.util.spec_from_file_location('longctx_config_file', path)
  if module_spec is None or not os.path.isfile(path):
    raise ConfigError('--config', spec, 'a readable Python file defining get_config(arg)')
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _config_spec(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a == '--config' and i + 1 < len(argv):
      return argv[i + 1]
    if a.startswith('--config='):
      return a.split('=', 1)[1]
  return None


def diagnose_override(argv: list[str]) -> ConfigError | None:
  """Finds what in argv is wrong: an unreadable config file, or the first `--config.x=y` naming no field."""
  spec = _config_spec(argv)
  if spec is None:
    return None
  try:
    cfg = load_file(spec)
  except ConfigError as e:
    return e
  except Exception as e:  # the config file itself raised
    return ConfigError('--config', spec, f'a config file whose get_config runs ({type(e).__name__}: {e})')
  for arg in argv:
    m = _OVERRIDE.match(arg)
    if not m:
      continue
    node, path = cfg, m.group(1).split('.')
    for i, part in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        where = '.'.join(path[:i]) or 'the top level'
        keys = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        return ConfigError('config.' + '.'.join(path), m.group(2), f'an existing key; keys under {where}: {keys}')
      node = node[part]
  return None

"""Bad configs fail before compute, naming the field, the value and what is allowed."""
import pytest

from longctx import config as config_lib
from tests.conftest import load_config, run_script, small_config

INVALID = [
    ({'model.num_heads': 3}, 'model.num_heads'),                      # does not divide d_model
    ({'model.num_kv_heads': 3}, 'model.num_kv_heads'),                # does not divide num_heads
    ({'data.seq_len': 300}, 'data.seq_len'),                          # not a multiple of the attention chunk
    ({'model.pattern': 'attention,mamba9'}, 'model.pattern'),         # list of the wrong length
    ({'model.pattern': 'mamba9'}, 'model.pattern'),                   # unknown mixer
    ({'train.optimizer': 'adamax'}, 'train.optimizer'),
    ({'train.schedule': 'step'}, 'train.schedule'),
    ({'model.remat': 'sometimes'}, 'model.remat'),
    ({'model.attention.impl': 'flash'}, 'model.attention.impl'),
    ({'train.nan_policy': 'ignore'}, 'train.nan_policy'),
    ({'train.init_on': 'gpu'}, 'train.init_on'),
    ({'train.grad_accum': 3}, 'train.grad_accum'),                    # does not divide the batch
    ({'data.source': 'wikipedia'}, 'data.source'),
    ({'data.source': 'text', 'data.path': '/nonexistent/*.txt'}, 'data.path'),
    ({'model.vocab_size': 100}, 'model.vocab_size'),                  # smaller than the byte vocabulary
    ({'train.warmup_steps': 10_000}, 'train.warmup_steps'),
    ({'model.pattern': 'titans', 'model.titans.anchor_batch': 5}, 'model.titans.anchor_batch'),   # divides no chunk
    ({'model.pattern': 'titans', 'model.titans.gate_granularity': 'segment'}, 'model.titans.gate_granularity'),
    ({'model.pattern': 'titans', 'model.titans.forget_gate': 'channel', 'model.titans.memory_depth': 3},
     'model.titans.forget_gate'),
]


@pytest.mark.parametrize('overrides,field', INVALID)
def test_invalid_config_names_its_field(overrides, field):
  cfg = load_config(**overrides)
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg, device_count=1)
  assert err.value.field == field
  assert field in err.value.report() and 'allowed' in err.value.report()


@pytest.mark.parametrize('parallel,devices,field', [
    ({'data': 3, 'fsdp': 1}, 4, 'parallel'),            # product differs from device count
    ({'data': -1, 'fsdp': 3}, 4, 'parallel.data'),      # -1 cannot fill
    ({'data': 2, 'fsdp': 2}, 4, None),
])
def test_mesh_sizes_must_multiply_to_device_count(parallel, devices, field):
  cfg = load_config(**{f'parallel.{k}': v for k, v in parallel.items()})
  if field is None:
    assert config_lib.mesh_shape(cfg.parallel, devices)['fsdp'] == 2
  else:
    with pytest.raises(config_lib.ConfigError) as err:
      config_lib.mesh_shape(cfg.parallel, devices)
    assert err.value.field == field


def test_batch_must_divide_over_data_parallel_devices():
  cfg = load_config(**{'train.batch_size': 6, 'parallel.data': 4})
  with pytest.raises(config_lib.ConfigError) as err:
    config_lib.validate(cfg, device_count=4)
  assert err.value.field == 'train.batch_size'


def test_variant_selects_size_and_rejects_unknown_keys():
  assert load_config('size=125m').model.d_model == 768
  with pytest.raises(config_lib.ConfigError):
    load_config('size=huge')
  with pytest.raises(config_lib.ConfigError):
    load_config('sise=125m')


def test_warmup_follows_num_steps_override():
  cfg = load_config(**{'train.num_steps': 50})
  assert cfg.train.warmup_steps == 5


def test_architecture_change_is_detected_but_schedule_change_is_not():
  saved = small_config().to_dict()
  assert config_lib.architecture_changes(saved, small_config(**{'train.num_steps': 99})) == []
  compute_only = {'model.remat': 'full', 'model.attention.impl': 'chunked', 'model.dtype': 'bfloat16'}
  assert config_lib.architecture_changes(saved, small_config(**compute_only)) == []
  changes = config_lib.architecture_changes(saved, small_config(**{'model.d_model': 128}))
  assert [c[0] for c in changes] == ['model.d_model']


@pytest.mark.parametrize('override,field', [
    ('--config.train.num_stepz=5', 'config.train.num_stepz'),          # unknown key
    ('--config.train.num_steps=many', 'command line'),                 # wrong type
    ('--config.model.num_kv_heads=3', 'model.num_kv_heads'),           # impossible combination
    ('missing:configs/nonexistent.py', '--config'),                    # no such config file
])
def test_cli_reports_bad_config_with_exit_code_2_and_no_traceback(tmp_path, override, field):
  config = 'configs/default.py'
  if override.startswith('missing:'):
    config, override = override.split(':', 1)[1], '--config.seed=1'
  result = run_script(['scripts/train.py', '--config', config, '--workdir', str(tmp_path), override])
  assert result.returncode == 2, result.stderr[-2000:]
  assert 'Traceback' not in result.stderr
  assert f'field:   {field}' in result.stderr
  if field == 'command line':
    assert 'num_steps' in result.stderr

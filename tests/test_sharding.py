"""The train step on 8 fake devices (data, fsdp, tensor meshes) equals the 1-device step."""

import pytest

from longctx.parallel.rules import logical_to_spec
from tests.conftest import script_json

pytestmark = pytest.mark.xdist_group('sharding')


@pytest.fixture(scope='module')
def sharded():
  return script_json(['tests/helpers/sharded_step.py'])


@pytest.mark.parametrize('mesh', ['data2_fsdp4', 'data2_fsdp2_tensor2', 'data2_sequence4_ring',
                                  'data2_sequence4_all_gather', 'data2_tensor2_sequence2_ring',
                                  'fsdp2_tensor2_sequence2_scanned'])
def test_sharded_step_equals_one_device(sharded, mesh):
  assert sharded[mesh]['loss_diff'] < 1e-5
  assert sharded[mesh]['param_rel'] < 1e-5


def test_replicated_parameters_are_reported_and_refused_above_the_tolerance(sharded):
  r = sharded['replication']
  assert r['even'] < 0.05 and r['even_check'] == 'passed'
  assert r['odd'] > 0.5 and r['odd_check'] == 'parallel.max_replicated'


def test_fsdp_and_tensor_axes_really_shard_parameters(sharded):
  assert any('fsdp' in s for s in sharded['data2_fsdp4']['specs'])
  assert any('tensor' in s for s in sharded['data2_fsdp2_tensor2']['specs'])
  assert any('fsdp' in s and 'tensor' in s for s in sharded['fsdp2_tensor2_sequence2_scanned']['specs'])


def test_rules_map_logical_names_to_mesh_axes():
  assert logical_to_spec(('batch', 'length')) == logical_to_spec(('batch', 'length'))
  spec = logical_to_spec(('embed', 'heads', 'head_dim'))
  assert tuple(spec) == ('fsdp', 'tensor', None)
  with pytest.raises(KeyError):
    logical_to_spec(('nonsense',))

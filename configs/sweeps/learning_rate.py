"""Learning rate × seed on the default tiny model: `scripts/sweep.py --sweep configs/sweeps/learning_rate.py`."""
import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.base = 'configs/default.py'              # the config every run starts from (file.py[:variant])
  # Every combination of the grid's values is one run; `fixed` overrides are shared by every run.
  c.grid = ml_collections.ConfigDict({'train.learning_rate': [1e-3, 3e-3], 'seed': [0, 1]}, allow_dotted_keys=True)
  c.fixed = ml_collections.ConfigDict({'train.num_steps': 200}, allow_dotted_keys=True)
  return c

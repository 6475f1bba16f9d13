"""The embedded default: an LCNN on scikit-learn's handwritten digits, about a minute on 2 CPU cores.

    python -m lcnn_jax.main --config configs/quickstart.py --workdir runs/quickstart

The digits LCNN (three 3×3 lookup convolutions of width 32/64/128 and a dense classifier) trains on the
1,437-image training split with the L1 proximal rule and is evaluated on the 360 held-out images; it ends by
printing its per-layer multiplications and the speedup over its dense twin, ``digits``. conv1 sees one grey
channel, so its one-atom dictionary is exact (k = m = 1).
"""

from lcnn_jax import config as config_lib


def get_config():
  return config_lib.digits_quickstart_config()

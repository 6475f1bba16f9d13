"""The embedded default: an LCNN on scikit-learn's handwritten digits, about a minute on 2 CPU cores.

    python -m lcnn_jax.main --config configs/quickstart.py --workdir runs/quickstart

The digits LCNN (three 3×3 lookup convolutions of width 32/64/128 and a dense classifier) trains on the
1,437-image training split with the L1 proximal rule and is evaluated on the 360 held-out images; it ends by
printing its per-layer multiplications and the speedup over its dense twin, ``digits``. conv1 sees one grey
channel, so its one-atom dictionary is exact (k = m = 1).

λ = ``sparsity.strength`` = 10 weighs as the original's ``-lambda 10`` (the proximal step accounts for momentum,
docs/operating_points.md) and ends near 39× fewer multiplications than the dense twin. For an operating point
chosen in advance, ask for it: ``--config.sparsity.target_speedup=10`` ends at 10.00×.
"""

from lcnn_jax import config as config_lib


def get_config():
  return config_lib.digits_quickstart_config()

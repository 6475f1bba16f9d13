"""Counting multiplications per layer, as the original's ``-benchmark`` mode does (REFERENCE §6).

    python -m lcnn_jax.flops (--workdir RUN [--step N] | --config configs/X.py) [--json] [--plot FILE.png]

Prints a run's checkpoint (or, with --config alone, an untrained model) layer by layer: the multiplications of one
image in eval mode beside its CNN baseline's, the speedup, and the parameters and bytes it stores; --json prints
one JSON object, --plot writes a PNG (docs/inspection.md).

This module is the command's name and nothing more: the command is :mod:`lcnn_jax.inspection`'s, the rules it
counts by are :mod:`lcnn_jax.counting`'s, whose names this module gives to code that reads them from here
(``flops.count_multiplications``). Neither of them imports this module, so the command's imports close no circle.
"""

from absl import flags

from lcnn_jax import cli, inspection
from lcnn_jax.counting import (VALUE_BYTES, LayerCount, MultiplicationCount, baseline_count, baseline_model,
                               count_multiplications, density, module_paths, stored_bytes, stored_parameters)

__all__ = ["VALUE_BYTES", "LayerCount", "MultiplicationCount", "baseline_count", "baseline_model",
           "count_multiplications", "density", "module_paths", "stored_bytes", "stored_parameters"]

if __name__ == "__main__":
  inspection.define_flags()
  flags.adopt_module_key_flags(inspection)  # --help lists them as this command's flags
  cli.run(inspection.main)

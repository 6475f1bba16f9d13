"""The paper's experiments as commands (docs/experiments.md).

* ``python -m lcnn_jax.experiments.spectrum``: accuracy against speedup as dictionary size and sparsity vary
  (the paper's Figure 3);
* ``python -m lcnn_jax.experiments.few_shot``: novel classes from n examples each, reusing dictionaries;
* ``python -m lcnn_jax.experiments.few_iteration``: a shallow net's dictionaries in a deeper one.
"""

"""Few-iteration learning on Fashion-MNIST at a scale that fits a shared 2-core machine.

    python -m lcnn_jax.experiments.few_iteration --config configs/experiments/few_iteration_fashion.py \\
        --workdir runs/few_iteration_fashion --shallow_depth 2 --deep_depth 3 --deep_steps 100 --eval_every 25 \\
        --seeds 0,1,2

A shallow ``mnist-lcnn`` (two convolutions per width: conv1 and ``conv1_2`` at 28×28, …) learns dictionaries
from the first 1,000 training images of each class (10,000 images, batch 64, 200 steps); a deeper one (three per
width) reuses them (``conv1_3`` takes ``conv1_2``'s, …) and trains only indices and coefficients, against the
deeper CNN and LCNN from scratch, all for the same 100 steps, evaluated on the 10,000 test images every 25. Every
LCNN is steered to a counted speedup of 10× (``sparsity.target_speedup``). Every run, the shallow one too, trains
once per seed. The experiment sets ``model.convs_per_stage``, the run lengths and the transfer keys.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.fashion_mnist_config(lcnn=True)
  c.model.head = "average"  # as measured in docs/experiments.md (the 12-epoch configs read every pixel)
  c.data.examples_per_class = 1000  # 10,000 training images
  c.train.batch_size = 64
  c.train.num_steps = 200  # the shallow run; the deep runs take --deep_steps
  c.train.warmup_steps = 20
  c.train.eval_every = 200
  c.train.checkpoint_every = 200
  c.train.log_every = 50
  c.sparsity.strength = 0.05  # the starting λ, steered to sparsity.target_speedup = 10
  return c

"""The speed/accuracy spectrum on Fashion-MNIST at a scale that fits a shared 2-core machine.

    python -m lcnn_jax.experiments.spectrum --config configs/experiments/spectrum_fashion.py \\
        --workdir runs/spectrum_fashion --points 16:2.5,16:5,8:10,8:20,4:40,4:80 --seeds 0,1,2 --nowall_clock

``configs/fashion_mnist_lcnn.py`` (the ``mnist-lcnn`` net) cut down: the first 1,000 training images of each
class (10,000 of the 60,000), batch 64, 300 steps (about two passes), one evaluation on all 10,000 test images
at the end. Each point takes 1–2 minutes on 2 idle CPU cores, so the CNN and six LCNN operating points × 3 seeds
(21 runs) fit in about 40 minutes; the accuracies are therefore those of a short run on a sixth of the data,
below what the 10-epoch ``configs/fashion_mnist*.py`` runs reach. The experiment sets per point the dictionary
size (``model.dictionary.convs``) and ``sparsity.target_speedup`` (``docs/operating_points.md``): the run steers λ,
starting from ``sparsity.strength``, so that its final checkpoint counts the requested speedup.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.fashion_mnist_config(lcnn=True)
  c.model.head = "average"  # as measured in docs/experiments.md (the 12-epoch configs read every pixel)
  c.data.examples_per_class = 1000  # the first 1,000 of each class: 10,000 training images
  c.train.batch_size = 64
  c.train.num_steps = 300
  c.train.warmup_steps = 30
  c.train.eval_every = 300  # once, at the end
  c.train.checkpoint_every = 300
  c.train.log_every = 50
  c.sparsity.strength = 0.05  # the starting λ; the experiment sets sparsity.target_speedup per point
  return c

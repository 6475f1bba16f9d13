"""Few-shot learning on Fashion-MNIST (``python -m lcnn_jax.experiments.few_shot``).

    python -m lcnn_jax.experiments.few_shot --config configs/experiments/few_shot_fashion.py \\
        --workdir runs/few_shot_fashion --ns 1,5,10,50 --novel_steps 100 [--config.seed=S]

Base runs learn classes 0-4 (T-shirt/top, Trouser, Pullover, Dress, Coat: 30,000 images) with the
``configs/fashion_mnist_lcnn.py`` recipe for 4 epochs (936 steps); novel runs learn classes 5-9 (Sandal, Shirt,
Sneaker, Bag, Ankle boot) from n training images each, the LCNN with the base LCNN's dictionaries frozen, the CNN
fine-tuned from the base CNN, the same ``--novel_steps`` each. The experiment sets ``data.classes``,
``data.examples_per_class``, the run lengths and the transfer keys. The strength is raised for the shorter base
run (see ``spectrum_fashion.py``). One seed per command: use ``--config.seed=S`` and one workdir per seed.
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.fashion_mnist_config(lcnn=True)
  c.train.epochs = 4
  c.train.warmup_steps = 100
  c.train.checkpoint_every = 2000
  c.train.log_every = 50
  c.sparsity.strength = 1.0
  return c

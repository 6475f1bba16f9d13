"""ResNet-18 CNN on ImageNet: the paper's baseline row (1.0×, 69.3% top-1 / 90.0% top-5).

    python -m lcnn_jax.main --config configs/resnet18.py --config.data.dir /data/imagenet --workdir runs/resnet18

The original's ``models/resnet.lua`` (shortcut type B) and recipe: batch 256, 55 epochs of 10,000 steps, the
ResNet schedule (0.1 … 1e-3, weight decay 5e-4 for the first 16 epochs), class-balanced sampling.
1,814,073,344 multiplications per 224×224 image (``python -m lcnn_jax.flops``).
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.imagenet_config("resnet", batch_size=256, lr_schedule="resnet")
  c.model.depth = 18
  c.sparsity.strength = 0.0
  return c

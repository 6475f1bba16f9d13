"""AlexNet CNN on ImageNet: the paper's baseline row (1.0×, 56.6% top-1 / 80.2% top-5).

    python -m lcnn_jax.main --config configs/alexnet.py --config.data.dir /data/imagenet --workdir runs/alexnet

The original's ``models/alexnet.lua`` and recipe: batch 128, 55 epochs of 10,000 steps, the AlexNet learning
rate schedule (1e-2 … 1e-4, no weight decay), class-balanced sampling. 1,135,256,096 multiplications per
224×224 image (``python -m lcnn_jax.flops``).
"""

from lcnn_jax import config as config_lib


def get_config():
  c = config_lib.imagenet_config("alexnet", batch_size=128, lr_schedule="alexnet")
  c.sparsity.strength = 0.0
  return c

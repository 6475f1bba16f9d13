"""ResNet-18 on ImageNet, the paper's ResNet-18 rows: the CNN baseline and ResNet-18-LCNN ``fast`` and ``accurate``.

    python -m lcnn_jax.main --config resnet18:fast --config.data.dir /data/imagenet --workdir runs/r18f

All three follow the original's recipe (``lcnn_jax.configs.imagenet``): batch 256, 55 epochs of 10,000 steps, the
ResNet schedule (0.1 … 1e-3, weight decay 5e-4 for the first 16 epochs), class-balanced sampling.

**cnn** (``--config resnet18``): the original's ``models/resnet.lua`` (shortcut type B), the paper's baseline row
(1.0×, 69.3% top-1 / 90.0% top-5). 1,814,073,344 multiplications per 224×224 image (``python -m lcnn_jax.flops``).

No ResNet dictionary sizes were ever published; the LCNNs' were chosen as follows. The 7×7 stem keeps the original's
default dictionary of 3 atoms (``model.dictionary.first``); projection shortcuts and the fc stay dense (19.8M
multiplications that no setting can remove). Each stage's dictionary is the same fraction of its input width m = 64,
128, 256, 512: the dictionary stage costs k·H_p·W_p·m per conv, and a stage halves H and W while doubling m, so
doubling k keeps every stage's dictionary cost about equal.

**fast** (``--config resnet18:fast``): the paper's 29.2× row (51.8% top-1 / 76.8% top-5). k = 3m/32: 6, 12, 24, 48
atoms (AlexNet-fast's 30 atoms are a similar fraction, 0.08–0.16, of conv3–conv5's widths); λ = 1.0 and initial
sparsity 0.01, as AlexNet-fast, so P should end about as dense as there: the AlexNet-fast sizes reach the paper's
37.6× at density d ≈ 0.039. Multiplications per 224×224 image against the CNN's 1,814,073,344 (``lcnn_jax.flops``,
every P at density d): 30.2× at d = 0.039 (AlexNet-fast's density), the paper's 29.2× at d ≈ 0.046, and at most 37.2×
(d → 0). Neighbours: 5, 10, 20, 40 atoms give 33.5× at d = 0.039; 8, 16, 32, 64 give 25.3×; a uniform 16 gives 28.4×.

**accurate** (``--config resnet18:accurate``): the paper's 5.0× row (62.2% top-1 / 84.6% top-5). k = 11m/16: 44, 88,
176, 352 atoms. Unlike AlexNet-accurate's 500 atoms they stay below m: with k = m the dictionary stages alone cap the
speedup at 5.6×. λ = 0.3 and initial sparsity 0.01, as AlexNet-accurate, so P should end about as dense as there: the
AlexNet-accurate sizes reach the paper's 3.2× at density d ≈ 0.097. Multiplications per 224×224 image against the
CNN's (every P at density d): 4.99× at d = 0.097 (AlexNet-accurate's density), the paper's 5.0× at d ≈ 0.096, and at
most 7.9× (d → 0). Neighbours at d = 0.097: 40, 80, 160, 320 atoms give 5.4×; 48, 96, 192, 384 give 4.6×; 64, 128,
256, 512 give 3.5×.

**Operating point** (fast and accurate): steered to the row's speedup by ``sparsity.target_speedup`` under the
original's ``threshold`` rule, as for AlexNet (``lcnn_jax/configs/alexnet.py`` says how and why);
``--config.sparsity.target_speedup=0`` gives the plain λ run.
"""

from lcnn_jax import config as config_lib
from lcnn_jax.configs import imagenet

VARIANTS = {
    "cnn": "the ResNet-18 CNN, the paper's baseline row (1.0×)",
    "fast": "ResNet-18-LCNN, the paper's 29.2× row",
    "accurate": "ResNet-18-LCNN, the paper's 5.0× row",
}
STAGES = {"fast": (6, 12, 24, 48), "accurate": (44, 88, 176, 352)}  # dictionary atoms of stage1..stage4


def get_config(variant: str = "cnn"):
  """The ResNet-18 run of ``variant`` (:data:`VARIANTS`)."""
  config_lib.check_variant("resnet18", variant, VARIANTS, "fast")
  c = imagenet.recipe("resnet" if variant == "cnn" else "resnet-lcnn", batch_size=256, lr_schedule="resnet")
  c.model.depth = 18
  if variant == "cnn":
    c.sparsity.strength = 0.0
    return c
  c.model.dictionary.first = 3  # the 7×7 stem
  for i, atoms in enumerate(STAGES[variant], 1):
    c.model.dictionary[f"stage{i}"] = atoms
  c.model.initial_sparsity = 0.01
  c.sparsity.rule = "threshold"
  if variant == "fast":
    c.sparsity.strength = 1.0  # the starting λ of the steering
    c.sparsity.target_speedup = 29.2
  else:
    c.sparsity.strength = 0.3  # the starting λ of the steering
    c.sparsity.target_speedup = 5.0
  return c

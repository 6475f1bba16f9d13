"""The models, built from ``config.model`` by the original's ``netType`` names: each is registered, with its keys
and its builder, by :func:`lcnn_jax.config.register_model` (docs/config.md lists every model's keys). Those that ship:

=============== ================================================== ========== ==========================================
name            model                                              baseline   ``model.dictionary``
=============== ================================================== ========== ==========================================
alexnet         AlexNet CNN (96-256-384-384-256)                   itself     (alexnet-lcnn's, ignored)
alexnet-lcnn    AlexNet-LCNN (64-192-384-256-256)                  alexnet    first, convs, fc, classifier
resnet          ResNet-8/18/34 (``model.depth``), shortcut type B  itself     (resnet-lcnn's, ignored)
resnet-lcnn     ResNet-LCNN                                        resnet     first, stage1, stage2, stage3, stage4
digits          small CNN for 8×8 digits and other small inputs    itself     (digits-lcnn's, ignored)
digits-lcnn     its LCNN twin                                      digits     first, convs, classifier
mnist           the small CNN pooled for 28×28 (Fashion-MNIST)     itself     (mnist-lcnn's, ignored)
mnist-lcnn      its LCNN twin                                      mnist      first, convs, classifier
=============== ================================================== ========== ==========================================

Every model takes NHWC float images and returns (batch, num_classes) logits. ``model.train()`` and
``model.eval()`` switch BatchNorm and Dropout; dropout draws from the ``dropout`` stream of the ``nnx.Rngs``
the model was built with (its ``default`` stream when there is none).
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import ml_collections
from flax import nnx

from lcnn_jax import config as config_lib
from lcnn_jax.models.alexnet import AlexNet
from lcnn_jax.models.resnet import STAGE_BLOCKS, ResNet
from lcnn_jax.models.small import DigitsNet

Builder = Callable[..., nnx.Module]

RESNET_DEPTHS = tuple(sorted(STAGE_BLOCKS))


def builder(name: str) -> Builder:
  """The builder of the model ``name`` that its registration names (a ``"module:function"`` is imported)."""
  target = config_lib.family(name).builder(name)
  if isinstance(target, str):
    module, _, function = target.partition(":")
    target = getattr(importlib.import_module(module), function)
  return target


def create_model(model_config: ml_collections.ConfigDict, *, num_classes: int,
                 input_shape: Sequence[int], rngs: nnx.Rngs) -> nnx.Module:
  """Builds ``model_config.name`` for ``num_classes`` outputs and one example's ``input_shape`` (h, w, c).

  Raises ValueError naming the key when ``model_config`` has a key the model does not take (a dictionary size of
  another model, a flat key of earlier versions) or a size that is not one (:func:`lcnn_jax.config.check_model`).
  """
  config_lib.check_model(model_config)
  if num_classes <= 0:
    raise ValueError(f"num_classes={num_classes}: must be positive.")
  if len(input_shape) != 3:
    raise ValueError(f"input_shape={tuple(input_shape)}: expected one example's (height, width, channels).")
  return builder(model_config.name)(model_config, num_classes=num_classes, input_shape=tuple(input_shape),
                                    rngs=rngs)


def baseline_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the dense CNN the paper compares ``model_config`` with (a CNN's is a copy of its own)."""
  config_lib.check_model(model_config)
  baseline = ml_collections.ConfigDict(model_config.to_dict())
  baseline.name = config_lib.baseline(model_config.name)
  return baseline


__all__ = ["AlexNet", "DigitsNet", "RESNET_DEPTHS", "ResNet", "baseline_config", "builder", "create_model"]

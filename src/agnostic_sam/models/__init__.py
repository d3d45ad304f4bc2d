"""Models as a registry: ``create_model(name, *, num_classes, in_channels=3, image_size=32)``.

Names (``list_models()``): ``mlp``, ``cnn``, ``resnet18``, ``resnet32``, ``wrn28_10``,
``pyramidnet101``, ``densenet121``, ``efficientnet_b3``, ``efficientnet_b4``, each with a tiny
``<name>_mini`` for tests. ``load_pretrained(model, weights)`` loads local checkpoints only.
"""

from agnostic_sam.models import cifar_resnets, pyramidnet, simple, tv_models  # noqa: F401
from agnostic_sam.models.registry import (
    MODELS,
    ModelSpec,
    create_model,
    list_models,
    register_model,
)
from agnostic_sam.models.weights import load_pretrained, resolve_weights

__all__ = [
    "MODELS",
    "ModelSpec",
    "create_model",
    "list_models",
    "load_pretrained",
    "register_model",
    "resolve_weights",
]

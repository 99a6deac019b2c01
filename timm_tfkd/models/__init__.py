"""timm models used by Tf-KD; importing this package registers them with timm."""
from timm.models import is_model, model_entrypoint

from .cifar import (
    CifarMobileNetV2,
    CifarNet,
    CifarResNet,
    CifarShuffleNetV2,
    cifar_mobilenetv2,
    cifar_resnet18,
    cifar_shufflenetv2,
)


def registered_here(model_name: str) -> bool:
    """Whether the architecture is one this package registers with timm (plain timm does not know it)."""
    return is_model(model_name) and model_entrypoint(model_name).__module__.startswith(__name__)

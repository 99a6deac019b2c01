"""timm models used by Tf-KD; importing this package registers them with timm."""
from .cifar import (
    CifarMobileNetV2,
    CifarNet,
    CifarResNet,
    CifarShuffleNetV2,
    cifar_mobilenetv2,
    cifar_resnet18,
    cifar_shufflenetv2,
)

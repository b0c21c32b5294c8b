"""Model families, the user's model by spec, and safe weight loading."""

from .cifar_resnet import CifarResNet, resnet20, resnet32, resnet44, resnet56, resnet110
from .spec import BuiltModel, ModelSpec, ModelSpecError, build_model
from .zoo import CIFAR_WEIGHTS, cifar_resnet_by_name, default_weights_path, load_weights

__all__ = ["CifarResNet", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
           "CIFAR_WEIGHTS", "cifar_resnet_by_name", "default_weights_path", "load_weights",
           "ModelSpec", "BuiltModel", "ModelSpecError", "build_model"]

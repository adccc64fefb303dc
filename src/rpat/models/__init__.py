"""The model zoo: CIFAR-style ResNet-18, PreAct ResNet-18, WRN-34-10, WRN-28-10, a small CNN, the Swish
DM networks of the generated-data models (``dm_*``), and the RPAT release's VGG16 and MobileNetV2.

All models take images in [0, 1] (normalization, if any, is a layer inside
the model) and expose the perception proxies of :data:`PROXIES` through
``forward_proxies``. Build them by name with :func:`create_model`; load public
or rpat weights with :func:`load_weights`;
:func:`infer_arch` tells which models a state_dict fits.
"""

from . import (  # noqa: F401 -- registers the models
    dm_resnet,
    mobilenetv2,
    preact_resnet,
    resnet,
    small_cnn,
    vgg,
    wide_resnet,
)
from .base import PROXIES, ImageClassifier
from .loading import infer_arch, load_weights
from .registry import create_model, list_models, register_model, resolve_model_name

__all__ = [
    "PROXIES",
    "ImageClassifier",
    "create_model",
    "infer_arch",
    "list_models",
    "load_weights",
    "register_model",
    "resolve_model_name",
]

"""Normalization for loaded checkpoints that expect mean/std-normalized inputs (``rpat eval --normalize``).

Many public CIFAR checkpoints were trained on ``(x - mean) / std`` inputs. rpat's
attacks work on images in [0, 1], so such a model is evaluated with the
normalization as its first layer (:class:`~rpat.models.base.Normalize`): the
attacks perturb and clip the [0, 1] image, the model sees the normalized one.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..errors import InputError
from .base import ImageClassifier, Normalize

#: Named statistics (per channel, [0, 1] pixel scale): the CIFAR training sets and ImageNet's usual ones.
NORMALIZE_PRESETS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def parse_normalize(text: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``"cifar10"`` (a preset) or ``"MEAN/STD"`` with comma-separated channels -> ``(mean, std)``.

    Example: ``"0.4914,0.4822,0.4465/0.2471,0.2435,0.2616"``. Raises InputError on anything else.
    """
    key = text.strip().lower()
    if key in NORMALIZE_PRESETS:
        return NORMALIZE_PRESETS[key]
    parts = text.split("/")
    if len(parts) != 2:
        raise InputError(f"--normalize {text!r}: give MEAN/STD (e.g. 0.4914,0.4822,0.4465/0.2471,0.2435,0.2616) "
                         f"or a preset: {', '.join(NORMALIZE_PRESETS)}")
    try:
        mean, std = (tuple(float(v) for v in p.split(",")) for p in parts)
    except ValueError:
        raise InputError(f"--normalize {text!r}: MEAN and STD must be comma-separated numbers") from None
    if len(mean) != len(std):
        raise InputError(f"--normalize {text!r}: MEAN has {len(mean)} value(s) but STD has {len(std)}")
    if not all(s > 0 for s in std):
        raise InputError(f"--normalize {text!r}: STD must be positive")
    return mean, std


def add_normalization(model: nn.Module, mean: Sequence[float], std: Sequence[float]) -> nn.Module:
    """``model`` taking [0, 1] images, with ``(x - mean) / std`` applied first.

    An rpat :class:`ImageClassifier` without normalization gets it as its own
    ``normalize`` layer (returned as is, proxies keep working); any other module is
    wrapped as ``Sequential(Normalize, model)``. A model that already normalizes
    its input is refused (InputError): normalizing twice is never intended.
    """
    if isinstance(model, ImageClassifier):
        if model.normalize.enabled:
            raise InputError(f"the model already normalizes its input ({model.normalize.extra_repr()}); "
                             "drop --normalize")
        if len(mean) != model.in_chans:
            raise InputError(f"--normalize has {len(mean)} channel(s) but the model takes {model.in_chans}")
        layer = Normalize(mean, std)
        p = next(model.parameters(), None)
        model.normalize = layer.to(p.device) if p is not None else layer
        return model
    return nn.Sequential(Normalize(mean, std), model)

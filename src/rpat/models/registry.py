"""Model registry: names -> constructors, with a few forgiving aliases.

Every registered constructor has the signature
``fn(num_classes, in_chans, mean, std, **extra) -> ImageClassifier`` (timm-like:
the same four leading arguments for all models), and ``create_model`` is the
one way the rest of the package builds a model by name.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from ..errors import InputError
from .base import ImageClassifier

ModelFn = Callable[..., ImageClassifier]
F = TypeVar("F", bound=ModelFn)

_MODELS: dict[str, ModelFn] = {}
_KEYS: dict[str, str] = {}  # normalized spelling (canonical name or alias) -> canonical name
_COMMON_ARGS = ("num_classes", "in_chans", "mean", "std")


def _key(name: str) -> str:
    """Spelling-insensitive key: lower case, only letters and digits (``WRN-34-10`` -> ``wrn3410``)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


def register_model(name: str, aliases: Iterable[str] = ()) -> Callable[[F], F]:
    """Decorator registering ``fn(num_classes, in_chans, mean, std, **extra)`` under ``name``.

    ``name`` is the canonical name shown by :func:`list_models`; it and every
    alias are also matched case-insensitively, ignoring ``-``/``_``/spaces.
    Registering a name or alias twice is a programming error (``ValueError``).
    """

    def decorator(fn: F) -> F:
        params = inspect.signature(fn).parameters
        missing = [a for a in _COMMON_ARGS if a not in params]
        if missing:
            raise TypeError(f"model constructor {fn.__name__} lacks argument(s) {', '.join(missing)}")
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        keys = {_key(name), *(_key(a) for a in aliases)}
        taken = sorted(k for k in keys if k in _KEYS)
        if taken:
            raise ValueError(f"model {name!r}: spelling(s) {', '.join(taken)} already registered")
        _MODELS[name] = fn
        for k in keys:
            _KEYS[k] = name
        return fn

    return decorator


def list_models() -> list[str]:
    """Canonical names of all registered models, sorted."""
    return sorted(_MODELS)


def resolve_model_name(name: str) -> str:
    """The canonical name for ``name`` or one of its aliases; ``InputError`` if unknown."""
    if isinstance(name, str):
        if name in _MODELS:
            return name
        canonical = _KEYS.get(_key(name))
        if canonical is not None:
            return canonical
    raise InputError(f"unknown model {name!r}; valid: {', '.join(list_models())}")


def create_model(
    name: str,
    num_classes: int = 10,
    in_chans: int = 3,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **kwargs: Any,
) -> ImageClassifier:
    """Build a registered model (randomly initialized, in training mode).

    Args:
        name: canonical name (see :func:`list_models`) or an alias such as
            ``"wrn-34-10"`` or ``"PreActResNet18"``.
        num_classes: size of the logits.
        in_chans: input channels (3 for RGB, 1 for grey-scale digits).
        mean, std: per-channel statistics of a normalization layer inside the
            model (inputs stay in [0, 1]); ``None`` for no normalization.
        **kwargs: model-specific extras (e.g. ``dropout`` for the WRNs,
            ``width`` for ``small_cnn``).

    Raises:
        InputError: unknown name, an extra argument the model does not take,
            or invalid sizes / statistics (one line, names the valid choices).
    """
    canonical = resolve_model_name(name)
    fn = _MODELS[canonical]
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if not takes_any:
        extras = [p for p in params if p not in _COMMON_ARGS]
        unknown = [k for k in kwargs if k not in extras]
        if unknown:
            valid = ", ".join(extras) if extras else "none"
            raise InputError(
                f"model {canonical!r} takes no argument {unknown[0]!r}; its extra arguments: {valid}"
            )
    model = fn(num_classes=num_classes, in_chans=in_chans, mean=mean, std=std, **kwargs)
    model.arch = canonical
    return model

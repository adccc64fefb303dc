"""The leaf interfaces of the objectives: ``Forwards`` and ``BaseMethod``; it imports no term.

A training step is: the method's attack makes ``x_adv`` (model in eval mode,
input gradients only), then the method's base loss is computed in train mode.
Forward passes go through ``Forwards``, which runs each distinct input once per
step, so the base loss and the terms added on top (RPAT, the ReBAT / RPAT++
teacher term; composed in ``objective.py``) share e.g. ``f(x_adv)``.
Every term and method module imports this one, never the composer.
"""

from __future__ import annotations

import torch
from torch import nn

from ..attacks.threat import ThreatModel
from .losses import check_smoothing


class Forwards:
    """Memoizes the model's forward passes within one training step.

    ``proxy`` names the perception proxy the step needs besides the logits;
    when it is not ``"logits"`` each input is run once through
    ``forward_proxies`` (logits come from the same pass).
    """

    def __init__(self, model: nn.Module, proxy: str = "logits"):
        self.model = model
        self.proxy_name = proxy
        self._out: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, key: str, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self._out.get(key)
        if out is None:
            if self.proxy_name == "logits":
                out = {"logits": self.model(x)}
            else:
                out = self.model.forward_proxies(x)
            self._out[key] = out
        return out

    def logits(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self(key, x)["logits"]

    def proxy(self, key: str, x: torch.Tensor) -> torch.Tensor:
        return self(key, x)[self.proxy_name]


class BaseMethod:
    """A base adversarial-training method: its attack and its loss.

    Subclasses set ``name`` (the registry key, e.g. ``"pgd_at"``), ``label`` (the human
    name in tables and logs, e.g. ``"PGD-AT"``) and implement ``attack`` and ``loss``. A method that
    trains on several augmented views of each image sets ``views`` (e.g. 2): the
    loader then yields ``x = cat([view_1, ..., view_V])`` ``(V·B, C, H, W)`` and
    ``y = cat([y] * V)``, and the method splits them itself (``x.chunk(V)``).
    ``rpat_pairs`` says which benign/adversarial pairs RPAT regularizes.
    """

    name: str = ""
    label: str = ""
    views: int = 1

    def rpat_pairs(self, x: torch.Tensor, x_adv: torch.Tensor) -> list[tuple[str, torch.Tensor, str, torch.Tensor]]:
        """``[(benign_key, x_b, adversarial_key, x_a), ...]``: the pairs R is averaged over.

        Keys are ``Forwards`` keys, so passes the base loss made are reused. Default:
        the whole batch, benign ``"clean"`` with its own adversarial example ``"adv"``
        (with several views stacked in the batch, R over all rows is the views' mean).
        """
        return [("clean", x, "adv", x_adv)]

    def __init__(self, threat: ThreatModel, label_smoothing: float = 0.0):
        self.threat = threat
        #: label smoothing in [0, 1) of every cross-entropy term of ``loss`` (``rpat.objectives.losses``)
        self.label_smoothing = check_smoothing(label_smoothing)

    def smoothing(self, override: float | torch.Tensor | None) -> float | torch.Tensor:
        """The smoothing ``loss`` applies: ``override`` (a float, or a per-example ``(B,)`` tensor) or,
        when None, the configured ``label_smoothing``."""
        return self.label_smoothing if override is None else override

    def attack(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """Training adversarial examples ``(B, C, H, W)`` in [0, 1]."""
        raise NotImplementedError

    def loss(
        self, fw: Forwards, x: torch.Tensor, y: torch.Tensor, x_adv: torch.Tensor,
        smoothing: float | torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(L_base, terms)``; terms are 0-dim tensors for logging (not synced).

        ``smoothing``: label smoothing of the loss's cross-entropy terms, a float or a per-example
        ``(B,)`` tensor (None: ``self.label_smoothing``; ``rpat.objectives.losses``).
        """
        raise NotImplementedError

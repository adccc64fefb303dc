"""Adversarial weight perturbation (AWP; Wu, Xia and Wang, NeurIPS 2020, public code csdongxian/AWP).

Per batch, after the attack has made ``x_adv`` (``Objective.step``'s ``after_attack`` hook):

1. the model's whole state (parameters and BatchNorm buffers) is copied, in place, into a
   proxy module made once (no copy of the module per step), which runs in train mode;
2. one plain SGD step of ``proxy_lr`` on the proxy *ascends* the method's loss on ``(x, x_adv)``:
   ``p = w + proxy_lr·∇_w L(w)`` (``loss="base"``: the base method's loss, as the published AT-AWP
   and TRADES-AWP code; ``loss="full"``: the whole training loss, with the RPAT and teacher terms);
3. for every parameter named ``*weight`` with more than one dimension (conv and linear weights,
   not BatchNorm, not biases): ``v_l = ‖w_l‖ / (‖p_l − w_l‖ + 1e-20) · (p_l − w_l)``;
4. :meth:`WeightPerturbation.perturb` adds ``γ·v`` to the model's weights; the training loss and its
   gradient are computed there, the optimizer steps, and :meth:`WeightPerturbation.restore` subtracts
   ``γ·v`` (``rpat.training.step.TrainStep``).

Only the proxy's BatchNorm statistics see the proxy's forward passes. Under DDP the proxy's gradients
are averaged over the ranks before its step, so every rank (identical weights) forms the same ``v``.
Under bf16 autocast the proxy passes run in the same autocast region as the step; the autocast cast
cache is cleared after the weights move (it would otherwise hand the loss the attack's casts of the
unperturbed weights). Nothing is read back to the host; the state AWP keeps (the proxy, ``v``) is
rebuilt from the model every step, so a resumed run needs nothing from the checkpoint.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..config import Config
from ..distributed import DistContext, all_reduce_mean_
from ..objectives import Forwards, Objective

#: the published code's guard against a zero ``‖p − w‖``
EPS = 1e-20


def perturbed_names(model: nn.Module) -> list[str]:
    """The parameters AWP perturbs: named ``*weight`` with ``ndim > 1`` (conv and linear weights)."""
    return [n for n, p in model.named_parameters() if n.endswith("weight") and p.ndim > 1]


class WeightPerturbation:
    """AWP for one model and objective (see the module docstring).

    ``gamma``: γ, the perturbation's size relative to each weight's norm; ``warmup_epochs``: the first
    0-based epoch with AWP on; ``proxy_lr``: the proxy's ascent step; ``loss``: ``"base"`` or ``"full"``;
    ``dist``: the process group context (the proxy's gradients are averaged over its ranks).
    """

    def __init__(self, model: nn.Module, objective: Objective, *, gamma: float, warmup_epochs: int = 0,
                 proxy_lr: float = 0.01, loss: str = "base", dist: DistContext | None = None):
        if loss not in ("base", "full"):
            raise ValueError(f"unknown AWP loss {loss!r}")
        self.model, self.objective = model, objective
        self.gamma, self.warmup_epochs = float(gamma), int(warmup_epochs)
        self.proxy_lr, self.loss_kind = float(proxy_lr), loss
        self.dist = dist if dist is not None else DistContext()
        self.proxy = copy.deepcopy(model).train()  # made once; its state is overwritten every step
        self.proxy.requires_grad_(True)
        self.names = perturbed_names(model)
        mp, pp = dict(model.named_parameters()), dict(self.proxy.named_parameters())
        self.weights = [mp[n] for n in self.names]  # the model's perturbed weights
        self.proxy_weights = [pp[n] for n in self.names]
        self._model_state = [t for t in model.state_dict(keep_vars=True).values()]
        self._proxy_state = [t for t in self.proxy.state_dict(keep_vars=True).values()]
        #: ``v`` of the current step, one buffer per perturbed weight (reused across steps)
        self.v = [torch.zeros_like(w) for w in self.weights]
        self.applied = False

    def active(self, epoch: int) -> bool:
        """Whether AWP runs at 0-based ``epoch`` (after the warm-up, and γ > 0)."""
        return self.gamma > 0 and epoch >= self.warmup_epochs

    def ascent_loss(self, x: Tensor, y: Tensor, x_adv: Tensor, epoch: int,
                    smoothing: float | Tensor | None = None) -> Tensor:
        """The loss the proxy ascends (0-dim, with grad to the proxy's parameters); ``smoothing``: the step's
        label smoothing (None: the method's ``label_smoothing``), so the proxy ascends the loss that is trained."""
        if self.loss_kind == "full":
            return self.objective.loss(self.proxy, x, y, x_adv, epoch, smoothing=smoothing)[0]
        return self.objective.method.loss(Forwards(self.proxy), x, y, x_adv, smoothing=smoothing)[0]

    @torch.no_grad()
    def _load_proxy(self) -> None:
        torch._foreach_copy_(self._proxy_state, self._model_state)

    def compute(self, x: Tensor, y: Tensor, x_adv: Tensor, epoch: int,
                smoothing: float | Tensor | None = None) -> list[Tensor]:
        """Steps 1-3: rebuild the proxy from the model, take its ascent step, form ``v`` (in ``self.v``).

        ``x``, ``x_adv``: ``(B, C, H, W)`` in [0, 1]; ``y``: ``(B,)``; returns ``v``, one tensor per perturbed weight.
        """
        self._load_proxy()
        self.proxy.train()
        with torch.enable_grad():
            loss = self.ascent_loss(x, y, x_adv, epoch, smoothing)
            grads = torch.autograd.grad(loss, self.proxy_weights, allow_unused=True)
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, self.proxy_weights, strict=True)]
        all_reduce_mean_(grads, self.dist)  # every rank takes the same proxy step
        with torch.no_grad():
            # plain SGD on -L: p = w - lr·∇(-L) = w + lr·∇L
            torch._foreach_add_(self.proxy_weights, grads, alpha=self.proxy_lr)
            torch._foreach_copy_(self.v, self.proxy_weights)
            torch._foreach_sub_(self.v, self.weights)  # p - w
            w_norms = torch._foreach_norm(self.weights)
            d_norms = torch._foreach_norm(self.v)
            for v, wn, dn in zip(self.v, w_norms, d_norms, strict=True):
                v.mul_(wn / (dn + EPS))
        return self.v

    def perturb(self, x: Tensor, y: Tensor, x_adv: Tensor, epoch: int,
                smoothing: float | Tensor | None = None) -> None:
        """Steps 1-4 up to the loss: form ``v`` and move the model's weights to ``w + γ·v``."""
        self.compute(x, y, x_adv, epoch, smoothing)
        with torch.no_grad():
            torch._foreach_add_(self.weights, self.v, alpha=self.gamma)
        self.applied = True
        dev = self.weights[0].device.type if self.weights else "cpu"
        if torch.is_autocast_enabled(dev):
            torch.clear_autocast_cache()  # the attack's casts of the unperturbed weights must not be reused

    def restore(self) -> None:
        """After the optimizer step: subtract ``γ·v`` again (a no-op when this step did not perturb)."""
        if not self.applied:
            return
        with torch.no_grad():
            torch._foreach_add_(self.weights, self.v, alpha=-self.gamma)
        self.applied = False


def build_awp(cfg: Config, model: nn.Module, objective: Objective,
              dist: DistContext | None = None) -> WeightPerturbation | None:
    """The AWP of ``cfg.awp`` for ``model`` (None when off); γ and warm-up resolved by ``Config.awp_settings``."""
    if not cfg.awp.enabled:
        return None
    gamma, warmup = cfg.awp_settings()
    return WeightPerturbation(model, objective, gamma=gamma, warmup_epochs=warmup, proxy_lr=cfg.awp.proxy_lr,
                              loss=cfg.awp.loss, dist=dist)

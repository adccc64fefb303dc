"""CutMix (Yun et al., ICCV 2019) on uint8 batches on the device, with labels mixed by the pasted area.

As the RPAT release's ``cutmix_data`` (RPAT_SOTAs / PKU-ML/ReBAT ``utils.py``): ``λ ~ Beta(1, 1)``
(uniform), a box of side ``int(W·√(1 − λ))`` by ``int(H·√(1 − λ))`` centred at a uniform pixel
``(cx, cy)``, its corners ``c ± side//2`` clipped to the image, and the box pasted from a partner
given by a random permutation of the batch. The label is then mixed by the **actual** pasted
fraction ``a = box area / (H·W)`` (after clipping):

    y = (1 − a)·onehot(y) + a·onehot(y[perm])          (B, K) float probabilities

Labels that are already soft ``(B, K)`` are mixed the same way. The release draws one λ and one box
per batch (``per_image=False``, what rpat's loader does); ``per_image=True`` draws them per image.

All draws come from the one ``torch.Generator`` passed in, in the order λ, cx, cy, perm; masks and
``torch.where`` replace the release's slicing, so nothing is read back to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["SOFT_LABEL_METHODS", "cutmix", "cutmix_boxes", "soft_label_refusal"]

#: Training methods whose every use of the labels takes (B, K) probabilities: the attack's and the loss's
#: cross-entropy (``F.cross_entropy`` with probability targets), TRADES' KL needs no labels.
SOFT_LABEL_METHODS: tuple[str, ...] = ("pgd_at", "trades")

_WHY_NOT: dict[str, str] = {
    "mart": "MART's boosted CE takes max_{k≠y} p_k and its KL weight 1 − p_y, which index the one true class",
    "consistency_at": "Consistency-AT's two views of an image would get different boxes and partners "
                      "(mixed labels for its views are not supported)",
}


def soft_label_refusal(method: str) -> str | None:
    """Why ``method`` cannot train on CutMix's soft labels (None when it can: ``SOFT_LABEL_METHODS``)."""
    if method in SOFT_LABEL_METHODS:
        return None
    return _WHY_NOT.get(method, f"method {method!r} has not been checked for soft (B, K) labels")


def cutmix_boxes(n: int, height: int, width: int, generator: torch.Generator,
                 device: torch.device | str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``n`` CutMix boxes as ``(y1, y2, x1, x2)``, each long ``(n,)``: rows ``y1 <= r < y2``, columns
    ``x1 <= c < x2``. Draws λ ``(n,)``, then cx, cy ``(n,)`` from ``generator``."""
    lam = torch.rand((n,), generator=generator, device=device)  # Beta(1, 1)
    cut = torch.sqrt(1.0 - lam)
    cut_w = (width * cut).long()  # int(): truncation, as the release's np.int32
    cut_h = (height * cut).long()
    cx = torch.randint(0, width, (n,), generator=generator, device=device)
    cy = torch.randint(0, height, (n,), generator=generator, device=device)
    x1, x2 = (cx - cut_w // 2).clamp(0, width), (cx + cut_w // 2).clamp(0, width)
    y1, y2 = (cy - cut_h // 2).clamp(0, height), (cy + cut_h // 2).clamp(0, height)
    return y1, y2, x1, x2


def cutmix(images: Tensor, labels: Tensor, num_classes: int, generator: torch.Generator, *,
           per_image: bool = False) -> tuple[Tensor, Tensor]:
    """CutMix a batch: ``images`` ``(B, C, H, W)`` (any dtype; uint8 in rpat), ``labels`` int ``(B,)`` or
    probabilities ``(B, K)``; ``num_classes`` K.

    Returns the mixed images (same dtype, a new tensor) and float32 ``(B, K)`` labels whose row ``i`` is
    ``(1 − a_i)·y_i + a_i·y_{perm[i]}``, ``a_i`` the fraction of image ``i``'s pixels pasted from image
    ``perm[i]``. No host sync.
    """
    if images.ndim != 4:
        raise ValueError(f"cutmix expects (B, C, H, W) images, got shape {tuple(images.shape)}")
    b, _, h, w = images.shape
    dev = images.device
    y1, y2, x1, x2 = cutmix_boxes(b if per_image else 1, h, w, generator, dev)
    perm = torch.randperm(b, generator=generator, device=dev)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    box = ((rows >= y1.view(-1, 1, 1)) & (rows < y2.view(-1, 1, 1))
           & (cols >= x1.view(-1, 1, 1)) & (cols < x2.view(-1, 1, 1)))  # (n, H, W)
    mixed = torch.where(box.unsqueeze(1), images[perm], images)
    area = ((y2 - y1) * (x2 - x1)).float().div_(h * w).view(-1, 1)  # (n, 1), broadcast over the batch
    if labels.ndim == 1:  # one-hot by comparison: F.one_hot checks the label range with a host read on the CPU
        soft = (labels.long().view(b, 1) == torch.arange(num_classes, device=dev)).float()
    else:
        soft = labels.float()
    return mixed, (1.0 - area) * soft + area * soft[perm]

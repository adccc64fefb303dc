"""AutoAugment's CIFAR-10 policy (Cubuk et al., CVPR 2019) as batched uint8 tensor ops on the device.

The policy is the paper's 25 sub-policies for CIFAR-10 (:data:`CIFAR10_POLICY`, as torchvision's
``AutoAugmentPolicy.CIFAR10`` and the ``CIFAR10Policy`` the RPAT release trains with list them); each
sub-policy is two ``(operation, probability, magnitude bin)`` pairs. For every image of a batch a
sub-policy is drawn uniformly, and each of its two operations is applied with its probability, at its
magnitude, with a random sign for the signed operations. Magnitudes come from 10 uniformly spaced bins
(:func:`magnitude`, torchvision's ``_augmentation_space(10, ...)``):

==============================  =================================================  ======
operation                       bin ``k`` (0..9)                                   signed
==============================  =================================================  ======
ShearX, ShearY                  shear factor ``0.3·k/9``                           yes
TranslateX, TranslateY          ``150/331·W·k/9`` px (``H`` for Y), truncated      yes
Rotate                          ``30·k/9`` degrees, counter-clockwise              yes
Brightness, Color, Contrast,    enhancement factor ``1 + 0.9·k/9``                 yes
Sharpness
Posterize                       bits kept ``8 − round(4·k/9)``                     no
Solarize                        threshold ``255·(1 − k/9)``                        no
AutoContrast, Equalize, Invert  (no magnitude)                                     no
==============================  =================================================  ======

Pixel conventions (those of torchvision's uint8 tensor functions, themselves following PIL):

- geometric ops sample the **nearest** source pixel: output pixel ``(x, y)`` has its centre at
  ``(x + ½, y + ½)``; the affine map sends it to a source point whose ``floor`` is the source pixel;
  points outside the image take ``fill`` (128, the release's grey ``CIFAR10Policy(fillcolor=(128,)*3)``).
  ShearX(m): source ``(x + ½ + m·(y + ½), y + ½)`` (PIL's ``(1, m, 0, 0, 1, 0)``); ShearY likewise;
  TranslateX(t): ``out[..., x] = in[..., x − t]`` (content moves ``t`` px right); Rotate(θ): about the
  image centre ``(W/2, H/2)``, counter-clockwise for θ > 0;
- blends (Brightness, Color, Contrast, Sharpness) are ``trunc(clamp(f·x + (1 − f)·d, 0, 255))`` with the
  degenerate image ``d``: black, the grey image, the mean of the grey image, or the 3×3 smoothed image
  (kernel ``[[1,1,1],[1,5,1],[1,1,1]]/13``, rounded, border pixels kept); grey is
  ``trunc(0.2989·R + 0.587·G + 0.114·B)`` (one channel: the image itself);
- point ops are per-(image, channel) lookup tables: Invert ``255 − x``; Solarize ``x ≥ t → 255 − x``;
  Posterize keeps the top ``bits`` bits; AutoContrast maps ``[min, max]`` of each channel to
  ``[0, 255]`` (truncated; a constant channel is left alone); Equalize is PIL's histogram
  equalization (``step = (N − h[max]) // 255``, ``lut[i] = (step // 2 + Σ_{j<i} h[j]) // step``).

The release's ``autoaug`` ends with Cutout (:func:`cutout`: a box of zeros of half the image side,
16×16 on CIFAR, at a uniform centre, clipped at the borders); :class:`rpat.data.batch_augment.BatchAugment`
applies it after the policy.

Every random draw comes from the one ``torch.Generator`` passed in (the loader's per-epoch
augmentation generator, seeded by ``(seed, epoch)``), with shapes fixed by the batch size, so a
batch's augmentation is a pure function of the generator state. All choices are made with
``torch.where`` masks: no ``.item()``, no host sync, no Python loop over images.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "CIFAR10_POLICY",
    "FILL",
    "NUM_BINS",
    "OPERATIONS",
    "SIGNED",
    "affine_nearest",
    "autoaugment",
    "autocontrast",
    "brightness",
    "color",
    "contrast",
    "cutout",
    "equalize",
    "grayscale",
    "invert",
    "magnitude",
    "posterize",
    "rotate",
    "sharpness",
    "shear_x",
    "shear_y",
    "solarize",
    "translate_x",
    "translate_y",
]

#: the operations of AutoAugment's search space that rpat implements (ids are positions in this tuple)
OPERATIONS: tuple[str, ...] = (
    "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
    "AutoContrast", "Invert", "Equalize", "Solarize", "Posterize",
    "Contrast", "Color", "Brightness", "Sharpness",
)
#: operations whose magnitude gets a random sign
SIGNED: frozenset[str] = frozenset(
    {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness", "Color", "Contrast", "Sharpness"})
_GEOMETRIC = ("ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate")
_POINT = ("AutoContrast", "Invert", "Equalize", "Solarize", "Posterize")
_BLEND = ("Contrast", "Color", "Brightness", "Sharpness")
NUM_BINS = 10
#: fill of pixels that geometric ops bring in from outside the image (the release's grey)
FILL = 128

SubPolicy = tuple[tuple[str, float, "int | None"], tuple[str, float, "int | None"]]

#: Cubuk et al. 2019, appendix Table 7 (CIFAR-10), in torchvision's order: (operation, probability, bin)
CIFAR10_POLICY: tuple[SubPolicy, ...] = (
    (("Invert", 0.1, None), ("Contrast", 0.2, 6)),
    (("Rotate", 0.7, 2), ("TranslateX", 0.3, 9)),
    (("Sharpness", 0.8, 1), ("Sharpness", 0.9, 3)),
    (("ShearY", 0.5, 8), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.5, None), ("Equalize", 0.9, None)),
    (("ShearY", 0.2, 7), ("Posterize", 0.3, 7)),
    (("Color", 0.4, 3), ("Brightness", 0.6, 7)),
    (("Sharpness", 0.3, 9), ("Brightness", 0.7, 9)),
    (("Equalize", 0.6, None), ("Equalize", 0.5, None)),
    (("Contrast", 0.6, 7), ("Sharpness", 0.6, 5)),
    (("Color", 0.7, 7), ("TranslateX", 0.5, 8)),
    (("Equalize", 0.3, None), ("AutoContrast", 0.4, None)),
    (("TranslateY", 0.4, 3), ("Sharpness", 0.2, 6)),
    (("Brightness", 0.9, 6), ("Color", 0.2, 8)),
    (("Solarize", 0.5, 2), ("Invert", 0.0, None)),
    (("Equalize", 0.2, None), ("AutoContrast", 0.6, None)),
    (("Equalize", 0.2, None), ("Equalize", 0.6, None)),
    (("Color", 0.9, 9), ("Equalize", 0.6, None)),
    (("AutoContrast", 0.8, None), ("Solarize", 0.2, 8)),
    (("Brightness", 0.1, 3), ("Color", 0.7, 0)),
    (("Solarize", 0.4, 5), ("AutoContrast", 0.9, None)),
    (("TranslateY", 0.9, 9), ("TranslateY", 0.7, 9)),
    (("AutoContrast", 0.9, None), ("Solarize", 0.8, 3)),
    (("Equalize", 0.8, None), ("Invert", 0.1, None)),
    (("TranslateY", 0.7, 9), ("AutoContrast", 0.9, None)),
)


def magnitude(op: str, level: int | None, height: int = 32, width: int = 32) -> float:
    """The unsigned magnitude of bin ``level`` (0..9) of ``op`` for ``height × width`` images (table above).

    Shear: factor; Translate: pixels (not yet truncated); Rotate: degrees; enhancements: ``f − 1``;
    Posterize: bits kept; Solarize: threshold (0..255); ops without a magnitude: 0.
    """
    if op not in OPERATIONS:
        raise ValueError(f"unknown AutoAugment operation {op!r}; valid: {', '.join(OPERATIONS)}")
    if op in ("AutoContrast", "Invert", "Equalize"):
        return 0.0
    if level is None or not 0 <= int(level) < NUM_BINS:
        raise ValueError(f"{op} needs a magnitude bin in 0..{NUM_BINS - 1}, got {level!r}")
    t = int(level) / (NUM_BINS - 1)
    if op in ("ShearX", "ShearY"):
        return 0.3 * t
    if op == "TranslateX":
        return 150.0 / 331.0 * width * t
    if op == "TranslateY":
        return 150.0 / 331.0 * height * t
    if op == "Rotate":
        return 30.0 * t
    if op in _BLEND:
        return 0.9 * t
    if op == "Posterize":
        return float(8 - round(4 * t))
    return 255.0 * (1.0 - t)  # Solarize


def _per_image(v: Tensor | float, b: int, device: torch.device) -> Tensor:
    """A float32 ``(B,)`` tensor from a scalar or a ``(B,)`` tensor."""
    return torch.as_tensor(v, dtype=torch.float32, device=device).expand(b).contiguous()


def _check(images: Tensor) -> None:
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"AutoAugment ops take uint8 (B, C, H, W) images, got {images.dtype} "
                         f"{tuple(images.shape)}")


# ---- geometric ops: one nearest-neighbour affine gather ----------------------------------
def affine_nearest(images: Tensor, matrix: Tensor, fill: int = FILL) -> Tensor:
    """Resample uint8 ``(B, C, H, W)`` images through per-image affine maps, nearest source pixel.

    ``matrix`` ``(B, 2, 3)`` maps an output pixel centre ``(x + ½, y + ½, 1)`` to the source point
    ``(xs, ys)``; the output pixel copies source pixel ``(floor(xs), floor(ys))``, or ``fill`` when that
    lies outside the image. The identity matrix returns the images unchanged.
    """
    _check(images)
    b, c, h, w = images.shape
    dev = images.device
    m = matrix.to(device=dev, dtype=torch.float32)
    xc = (torch.arange(w, device=dev, dtype=torch.float32) + 0.5).view(1, 1, w)
    yc = (torch.arange(h, device=dev, dtype=torch.float32) + 0.5).view(1, h, 1)

    def coord(row: int) -> Tensor:  # (B, H, W)
        return m[:, row, 0].view(b, 1, 1) * xc + m[:, row, 1].view(b, 1, 1) * yc + m[:, row, 2].view(b, 1, 1)

    ix, iy = coord(0).floor().long(), coord(1).floor().long()
    inside = (ix >= 0) & (ix < w) & (iy >= 0) & (iy < h)
    flat = (iy.clamp(0, h - 1) * w + ix.clamp(0, w - 1)).view(b, 1, h * w).expand(b, c, h * w)
    out = images.reshape(b, c, h * w).gather(2, flat).view(b, c, h, w)
    return torch.where(inside.view(b, 1, h, w), out, fill)


def _geometric_matrices(op_name: str, mag: Tensor, h: int, w: int) -> Tensor:
    """``(B, 2, 3)`` source maps of ``op_name`` with signed magnitudes ``mag`` ``(B,)``."""
    op = torch.full_like(mag, OPERATIONS.index(op_name), dtype=torch.long)
    return _matrices(op, mag, h, w)


def _matrices(op: Tensor, mag: Tensor, h: int, w: int) -> Tensor:
    """``(B, 2, 3)`` source maps: image ``i`` gets operation ``op[i]`` at ``mag[i]`` (identity for an id
    that is not geometric). Rows ``(a, b, c), (d, e, f)``: ``xs = a·xc + b·yc + c``, ``ys = d·xc + e·yc + f``."""
    def is_op(name: str) -> Tensor:
        return op == OPERATIONS.index(name)

    zero, one = torch.zeros_like(mag), torch.ones_like(mag)
    rot = is_op("Rotate")
    rad = torch.where(rot, mag, zero) * (math.pi / 180.0)
    cos, sin = torch.cos(rad), torch.sin(rad)  # (1, 0) where not rotating
    cx, cy = w / 2.0, h / 2.0  # Rotate: counter-clockwise about the centre
    shift = -mag.trunc()  # Translate: out[x] = in[x - t]
    a = torch.where(rot, cos, one)
    b = torch.where(is_op("ShearX"), mag, torch.where(rot, -sin, zero))
    c = torch.where(is_op("TranslateX"), shift, torch.where(rot, cx - cos * cx + sin * cy, zero))
    d = torch.where(is_op("ShearY"), mag, torch.where(rot, sin, zero))
    e = a
    f = torch.where(is_op("TranslateY"), shift, torch.where(rot, cy - sin * cx - cos * cy, zero))
    return torch.stack([a, b, c, d, e, f], dim=1).view(-1, 2, 3)


def shear_x(images: Tensor, factor: Tensor | float, fill: int = FILL) -> Tensor:
    """ShearX: ``out[y, x] = in[y, floor(x + ½ + factor·(y + ½))]`` (``factor`` scalar or ``(B,)``)."""
    b, _, h, w = images.shape
    return affine_nearest(images, _geometric_matrices("ShearX", _per_image(factor, b, images.device), h, w), fill)


def shear_y(images: Tensor, factor: Tensor | float, fill: int = FILL) -> Tensor:
    """ShearY: ``out[y, x] = in[floor(y + ½ + factor·(x + ½)), x]``."""
    b, _, h, w = images.shape
    return affine_nearest(images, _geometric_matrices("ShearY", _per_image(factor, b, images.device), h, w), fill)


def translate_x(images: Tensor, pixels: Tensor | float, fill: int = FILL) -> Tensor:
    """TranslateX by ``trunc(pixels)``: ``out[..., x] = in[..., x − t]`` (content moves right for t > 0)."""
    b, _, h, w = images.shape
    return affine_nearest(images, _geometric_matrices("TranslateX", _per_image(pixels, b, images.device), h, w),
                          fill)


def translate_y(images: Tensor, pixels: Tensor | float, fill: int = FILL) -> Tensor:
    """TranslateY by ``trunc(pixels)``: ``out[y, :] = in[y − t, :]`` (content moves down for t > 0)."""
    b, _, h, w = images.shape
    return affine_nearest(images, _geometric_matrices("TranslateY", _per_image(pixels, b, images.device), h, w),
                          fill)


def rotate(images: Tensor, degrees: Tensor | float, fill: int = FILL) -> Tensor:
    """Rotate by ``degrees`` counter-clockwise about the image centre, nearest pixel."""
    b, _, h, w = images.shape
    return affine_nearest(images, _geometric_matrices("Rotate", _per_image(degrees, b, images.device), h, w), fill)


# ---- point ops: per-(image, channel) lookup tables ---------------------------------------
def _identity_lut(images: Tensor) -> Tensor:
    """uint8 ``(B, C, 256)`` (an expanded view): ``lut[b, c, i] = i``."""
    b, c = images.shape[:2]
    return torch.arange(256, device=images.device, dtype=torch.uint8).expand(b, c, 256)


def _apply_lut(images: Tensor, lut: Tensor) -> Tensor:
    """``out[b, c, y, x] = lut[b, c, images[b, c, y, x]]``; ``lut`` uint8 ``(B, C, 256)``."""
    b, c, h, w = images.shape
    return lut.gather(2, images.reshape(b, c, h * w).long()).view(b, c, h, w)


def _invert_lut(images: Tensor) -> Tensor:
    return 255 - _identity_lut(images)


def _solarize_lut(images: Tensor, threshold: Tensor) -> Tensor:
    i = _identity_lut(images)
    return torch.where(i.float() >= threshold.view(-1, 1, 1), 255 - i, i)


def _posterize_lut(images: Tensor, bits: Tensor) -> Tensor:
    shift = (8 - bits.round().long().clamp(0, 8)).view(-1, 1, 1)
    mask = 256 - torch.bitwise_left_shift(torch.ones_like(shift), shift)  # top `bits` bits set
    return _identity_lut(images) & mask.to(torch.uint8)


def _autocontrast_lut(images: Tensor) -> Tensor:
    flat = images.flatten(2).float()  # (B, C, HW)
    lo, hi = flat.amin(dim=2, keepdim=True), flat.amax(dim=2, keepdim=True)  # (B, C, 1)
    const = lo == hi
    lo = torch.where(const, torch.zeros_like(lo), lo)
    hi = torch.where(const, torch.full_like(hi, 255.0), hi)
    scale = 255.0 / (hi - lo)
    i = _identity_lut(images).float()
    return ((i - lo) * scale).clamp_(0, 255).to(torch.uint8)  # truncates


def _equalize_lut(images: Tensor) -> Tensor:
    b, c, h, w = images.shape
    idx = images.reshape(b, c, h * w).long()
    hist = torch.zeros(b, c, 256, device=images.device, dtype=torch.long)
    hist.scatter_add_(2, idx, torch.ones_like(idx))
    top = hist.gather(2, idx.amax(dim=2, keepdim=True))  # count of the largest value present (B, C, 1)
    step = (h * w - top) // 255
    before = hist.cumsum(2) - hist  # Σ_{j<i} h[j]
    lut = ((step // 2 + before) // step.clamp_min(1)).clamp_(max=255).to(torch.uint8)
    return torch.where(step == 0, _identity_lut(images), lut)


def invert(images: Tensor) -> Tensor:
    """Invert: ``255 − x``."""
    _check(images)
    return _apply_lut(images, _invert_lut(images))


def solarize(images: Tensor, threshold: Tensor | float) -> Tensor:
    """Solarize: pixels ``x ≥ threshold`` become ``255 − x`` (threshold scalar or ``(B,)``)."""
    _check(images)
    return _apply_lut(images, _solarize_lut(images, _per_image(threshold, images.shape[0], images.device)))


def posterize(images: Tensor, bits: Tensor | int) -> Tensor:
    """Posterize: keep the top ``bits`` (0..8) bits of every pixel, ``x & (0xFF << (8 − bits))``."""
    _check(images)
    return _apply_lut(images, _posterize_lut(images, _per_image(bits, images.shape[0], images.device)))


def autocontrast(images: Tensor) -> Tensor:
    """AutoContrast: each channel's ``[min, max]`` stretched to ``[0, 255]``, truncated; constant channels kept."""
    _check(images)
    return _apply_lut(images, _autocontrast_lut(images))


def equalize(images: Tensor) -> Tensor:
    """Equalize: PIL's per-channel histogram equalization (see the module docstring)."""
    _check(images)
    return _apply_lut(images, _equalize_lut(images))


# ---- blends: f·x + (1 − f)·degenerate ------------------------------------------------------
def grayscale(images: Tensor) -> Tensor:
    """Grey level ``trunc(0.2989·R + 0.587·G + 0.114·B)`` as float ``(B, 1, H, W)`` (one channel: itself)."""
    x = images.float()
    if x.shape[1] != 3:
        return x[:, :1]
    return (0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).trunc()


def _smoothed(images: Tensor) -> Tensor:
    """PIL's SMOOTH filter ``[[1,1,1],[1,5,1],[1,1,1]]/13``, rounded, border pixels kept; float.

    The 3×3 box sum is separable: three column slices, then three row slices (far faster than a
    grouped convolution on the CPU); the centre gets 4 more."""
    x = images.float()
    h, w = x.shape[-2:]
    if h <= 2 or w <= 2:
        return x
    rows = x[..., :, :-2] + x[..., :, 1:-1]  # in place from here: large CPU temporaries cost page faults
    rows += x[..., :, 2:]  # (.., H, W - 2)
    total = rows[..., :-2, :] + rows[..., 1:-1, :]
    total += rows[..., 2:, :]
    total.add_(x[..., 1:-1, 1:-1], alpha=4.0).div_(13.0).round_()
    x[..., 1:-1, 1:-1] = total
    return x


def _blend(images: Tensor, degenerate: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    out = images.float().mul_(f).add_((1.0 - f) * degenerate)  # f·x + (1 − f)·d
    return out.clamp_(0, 255).to(torch.uint8)  # float -> uint8 truncates


def brightness(images: Tensor, factor: Tensor | float) -> Tensor:
    """Brightness: blend with black, ``trunc(clamp(f·x))``."""
    _check(images)
    f = _per_image(factor, images.shape[0], images.device)
    return _blend(images, torch.zeros((), device=images.device), f)


def color(images: Tensor, factor: Tensor | float) -> Tensor:
    """Color (saturation): blend with the grey image."""
    _check(images)
    return _blend(images, grayscale(images), _per_image(factor, images.shape[0], images.device))


def contrast(images: Tensor, factor: Tensor | float) -> Tensor:
    """Contrast: blend with the mean of the grey image (one value per image)."""
    _check(images)
    mean = grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, _per_image(factor, images.shape[0], images.device))


def sharpness(images: Tensor, factor: Tensor | float) -> Tensor:
    """Sharpness: blend with the smoothed image (factor > 1 sharpens, < 1 blurs)."""
    _check(images)
    return _blend(images, _smoothed(images), _per_image(factor, images.shape[0], images.device))


# ---- Cutout ----------------------------------------------------------------------------------
def cutout(images: Tensor, size: int, generator: torch.Generator) -> Tensor:
    """Cutout (DeVries & Taylor 2017) as the release's ``CutoutDefault(size)``: per image a centre
    ``(cy, cx)`` uniform over the pixels, the box ``[c − size//2, c + size//2)`` clipped to the image,
    set to 0. Draws ``cy`` then ``cx`` ``(B,)`` from ``generator``; no host sync. ``size = 0``: unchanged."""
    _check(images)
    if size <= 0:
        return images
    b, _, h, w = images.shape
    dev = images.device
    cy = torch.randint(0, h, (b, 1, 1), generator=generator, device=dev)
    cx = torch.randint(0, w, (b, 1, 1), generator=generator, device=dev)
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    half = size // 2
    box = (rows >= cy - half) & (rows < cy + half) & (cols >= cx - half) & (cols < cx + half)
    return images.masked_fill(box.unsqueeze(1), 0)


# ---- the policy --------------------------------------------------------------------------
_TABLES: dict[tuple, tuple[Tensor, Tensor, Tensor, Tensor]] = {}


def _tables(policy: tuple[SubPolicy, ...], h: int, w: int,
            device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(op ids (S, 2) long, probabilities (S, 2), unsigned magnitudes (S, 2), signed flags (n_ops,))`` of
    ``policy`` on ``device``; built once per (policy, image size, device) and cached, so a batch makes no
    host-to-device copy (on CUDA a copy from pageable memory would wait for the stream)."""
    key = (policy, h, w, str(device))
    if key not in _TABLES:
        ops = [[OPERATIONS.index(name) for name, _, _ in sub] for sub in policy]
        probs = [[float(p) for _, p, _ in sub] for sub in policy]
        mags = [[magnitude(name, level, h, w) for name, _, level in sub] for sub in policy]
        _TABLES[key] = (torch.tensor(ops, dtype=torch.long).to(device),
                        torch.tensor(probs, dtype=torch.float32).to(device),
                        torch.tensor(mags, dtype=torch.float32).to(device),
                        torch.tensor([name in SIGNED for name in OPERATIONS]).to(device))
    return _TABLES[key]


def _apply_slot(images: Tensor, op: Tensor, mag: Tensor, names: set[str], fill: int) -> Tensor:
    """Apply operation ``op[i]`` (an id, or -1 for none) at signed magnitude ``mag[i]`` to each image ``i``.

    Only the operations in ``names`` (those this slot of the policy can draw) are computed, each for the
    whole batch; ``torch.where`` keeps, per image, the one it drew.
    """
    b, c, h, w = images.shape

    def is_op(name: str) -> Tensor:
        return op == OPERATIONS.index(name)

    out = images
    point = [n for n in _POINT if n in names]
    if point:
        lut = _identity_lut(images)
        for n in point:
            if n == "Invert":
                cand = _invert_lut(images)
            elif n == "Solarize":
                cand = _solarize_lut(images, mag)
            elif n == "Posterize":
                cand = _posterize_lut(images, torch.where(is_op(n), mag, torch.full_like(mag, 8.0)))
            elif n == "AutoContrast":
                cand = _autocontrast_lut(images)
            else:
                cand = _equalize_lut(images)
            lut = torch.where(is_op(n).view(b, 1, 1), cand, lut)
        out = _apply_lut(images, lut)
    blend = [n for n in _BLEND if n in names]
    if blend:
        degenerate = torch.zeros((b, 1, h, w), device=images.device)  # Brightness: black
        if "Color" in names or "Contrast" in names:
            gray = grayscale(images)
            if "Color" in names:
                degenerate = torch.where(is_op("Color").view(b, 1, 1, 1), gray, degenerate)
            if "Contrast" in names:
                mean = gray.mean(dim=(1, 2, 3), keepdim=True).expand(b, 1, h, w)
                degenerate = torch.where(is_op("Contrast").view(b, 1, 1, 1), mean, degenerate)
        if "Sharpness" in names:
            degenerate = torch.where(is_op("Sharpness").view(b, 1, 1, 1), _smoothed(images), degenerate)
        chosen = torch.zeros_like(op, dtype=torch.bool)
        for n in blend:
            chosen |= is_op(n)
        out = torch.where(chosen.view(b, 1, 1, 1), _blend(images, degenerate, 1.0 + mag), out)
    geometric = [n for n in _GEOMETRIC if n in names]
    if geometric:
        chosen = torch.zeros_like(op, dtype=torch.bool)
        for n in geometric:
            chosen |= is_op(n)
        out = torch.where(chosen.view(b, 1, 1, 1), affine_nearest(images, _matrices(op, mag, h, w), fill), out)
    return out


def autoaugment(images: Tensor, generator: torch.Generator, policy: tuple[SubPolicy, ...] = CIFAR10_POLICY,
                fill: int = FILL) -> Tensor:
    """Apply an AutoAugment ``policy`` (default: CIFAR-10's 25 sub-policies) to uint8 ``(B, C, H, W)`` images.

    Per image ``i``: a sub-policy ``s_i`` uniform over the policy, then for each of its two operations
    a uniform ``u`` (applied when ``u < p``) and a sign ``±1`` (used by the signed operations). Draws,
    in this order, from ``generator`` (on the images' device): ``s`` ``(B,)``, ``u`` ``(B, 2)``,
    signs ``(B, 2)``. Returns a new uint8 tensor of the same shape; no host sync.
    """
    _check(images)
    b, _, h, w = images.shape
    dev = images.device
    ops, probs, mags, signed = _tables(policy, h, w, dev)
    sub = torch.randint(0, len(policy), (b,), generator=generator, device=dev)
    u = torch.rand((b, 2), generator=generator, device=dev)
    signs = torch.randint(0, 2, (b, 2), generator=generator, device=dev).float() * 2 - 1
    out = images
    for k in range(2):
        op = ops[sub, k]
        mag = torch.where(signed[op], mags[sub, k] * signs[:, k], mags[sub, k])
        op = torch.where(u[:, k] < probs[sub, k], op, torch.full_like(op, -1))
        out = _apply_slot(out, op, mag, {s[k][0] for s in policy}, fill)
    return out

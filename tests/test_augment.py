"""AutoAugment (CIFAR-10 policy) and CutMix on the device: hand-computed ops, the published policy,
determinism, the start epoch, labels mixed by the pasted area, and soft labels through training."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rpat.attacks.pgd import cross_entropy_sum
from rpat.cli import main
from rpat.config import build_config
from rpat.data import ArrayDataset, DeviceLoader, random_crop_flip
from rpat.data import autoaugment as aa
from rpat.data.batch_augment import BatchAugment
from rpat.data.cutmix import cutmix, cutmix_boxes
from rpat.errors import InputError
from rpat.training import RunData, Trainer

SRC = Path(__file__).resolve().parents[1] / "src" / "rpat" / "data"


def _u8(rows) -> torch.Tensor:
    """A one-image, one-channel uint8 batch ``(1, 1, H, W)`` from nested lists."""
    return torch.tensor(rows, dtype=torch.uint8).view(1, 1, len(rows), len(rows[0]))


def _grid4() -> torch.Tensor:
    return torch.arange(16, dtype=torch.uint8).view(1, 1, 4, 4)


# ---- the policy, as published --------------------------------------------------------------------
#: Cubuk et al. 2019, appendix (CIFAR-10), as torchvision's AutoAugmentPolicy.CIFAR10 lists them
PUBLISHED_CIFAR10 = [
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
]


def test_policy_is_exactly_the_published_25_sub_policies():
    assert len(aa.CIFAR10_POLICY) == 25
    assert [tuple(s) for s in aa.CIFAR10_POLICY] == PUBLISHED_CIFAR10
    used = {name for sub in aa.CIFAR10_POLICY for name, _, _ in sub}
    assert used <= set(aa.OPERATIONS)
    assert used == set(aa.OPERATIONS) - {"ShearX"}  # the CIFAR-10 policy never draws ShearX


def test_magnitude_bins():
    assert [aa.magnitude("ShearY", k) for k in (0, 8, 9)] == pytest.approx([0.0, 0.3 * 8 / 9, 0.3])
    assert aa.magnitude("TranslateX", 9, 32, 32) == pytest.approx(150 / 331 * 32)  # 14.50 px -> 14
    assert aa.magnitude("TranslateY", 3, 64, 32) == pytest.approx(150 / 331 * 64 / 3)  # Y scales with H
    assert aa.magnitude("Rotate", 2) == pytest.approx(30 * 2 / 9)
    assert [aa.magnitude("Contrast", k) for k in (0, 6, 9)] == pytest.approx([0.0, 0.6, 0.9])
    assert [aa.magnitude("Posterize", k) for k in range(10)] == [8, 8, 7, 7, 6, 6, 5, 5, 4, 4]
    assert [aa.magnitude("Solarize", k) for k in range(10)] == pytest.approx([255 - 255 * k / 9 for k in range(10)])
    assert aa.magnitude("Invert", None) == 0.0
    assert aa.SIGNED == {"ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate",
                         "Brightness", "Color", "Contrast", "Sharpness"}
    with pytest.raises(ValueError):
        aa.magnitude("Rotate", 10)


# ---- each operation against a hand computation ------------------------------------------------------
def test_point_ops_by_hand():
    x = _u8([[0, 127, 128, 255]])
    assert aa.invert(x).flatten().tolist() == [255, 128, 127, 0]
    assert aa.solarize(x, 128).flatten().tolist() == [0, 127, 127, 0]  # x >= 128 -> 255 - x
    assert aa.solarize(x, 255).flatten().tolist() == [0, 127, 128, 0]
    p = _u8([[0b11111111, 0b01111111, 0b00111111, 0b10101010]])
    assert aa.posterize(p, 2).flatten().tolist() == [192, 64, 0, 128]  # top 2 bits
    assert aa.posterize(p, 8).flatten().tolist() == p.flatten().tolist()
    assert aa.posterize(p, 4).flatten().tolist() == [0xF0, 0x70, 0x30, 0xA0]


def test_autocontrast_by_hand():
    # channel 0: min 50, max 150 -> (x - 50)·255/100, truncated; channel 1 constant: untouched
    x = torch.tensor([[[[50, 100, 150]], [[7, 7, 7]]]], dtype=torch.uint8)
    out = aa.autocontrast(x)
    assert out[0, 0].flatten().tolist() == [0, 127, 255]
    assert out[0, 1].flatten().tolist() == [7, 7, 7]


def test_equalize_against_a_hand_histogram():
    # 32x32 = 1024 pixels: 512 of value 10, 256 of 20, 256 of 30. h[max] = 256, so
    # step = (1024 - 256) // 255 = 3 and lut[i] = (3 // 2 + sum_{j<i} h[j]) // 3:
    # lut[10] = 1 // 3 = 0, lut[20] = (1 + 512) // 3 = 171, lut[30] = min(255, (1 + 768) // 3 = 256) = 255
    img = torch.full((1, 1, 32, 32), 10, dtype=torch.uint8)
    img[0, 0, 16:24] = 20
    img[0, 0, 24:] = 30
    out = aa.equalize(img)
    assert torch.equal(out[img == 10], torch.zeros(512, dtype=torch.uint8))
    assert torch.equal(out[img == 20], torch.full((256,), 171, dtype=torch.uint8))
    assert torch.equal(out[img == 30], torch.full((256,), 255, dtype=torch.uint8))
    # too few pixels for a step (N - h[max] < 255): left unchanged, as PIL does
    small = _u8([[0, 0, 1, 2]])
    assert torch.equal(aa.equalize(small), small)


def test_blends_by_hand():
    x = _u8([[0, 100, 201, 255]])
    assert aa.brightness(x, 0.5).flatten().tolist() == [0, 50, 100, 127]  # trunc(0.5·x)
    assert aa.brightness(x, 1.5).flatten().tolist() == [0, 150, 255, 255]  # clamped at 255
    # contrast: the grey mean of [0, 100] is 50; f = 2 -> 2x - 50, clamped
    c = _u8([[0, 100]])
    assert aa.contrast(c, 2.0).flatten().tolist() == [0, 150]
    assert aa.contrast(c, 0.0).flatten().tolist() == [50, 50]
    # color: the grey level of (200, 0, 0) is trunc(0.2989·200) = 59
    rgb = torch.tensor([200, 0, 0], dtype=torch.uint8).view(1, 3, 1, 1)
    assert aa.grayscale(rgb).item() == 59
    assert aa.color(rgb, 0.0).flatten().tolist() == [59, 59, 59]
    assert aa.color(rgb, 0.5).flatten().tolist() == [129, 29, 29]  # trunc(100 + 29.5), trunc(29.5)
    # sharpness: 3x3 zeros with 130 in the centre; smoothed centre = round(5·130/13) = 50, border kept
    s = _u8([[0, 0, 0], [0, 130, 0], [0, 0, 0]])
    assert aa.sharpness(s, 0.0).flatten().tolist() == [0, 0, 0, 0, 50, 0, 0, 0, 0]
    assert aa.sharpness(s, 2.0).flatten().tolist() == [0, 0, 0, 0, 210, 0, 0, 0, 0]  # 2·130 - 50


def test_geometric_ops_nearest_on_a_4x4_image():
    g, f = _grid4(), 128  # g[y, x] = 4y + x
    # ShearX 0.5: out[y, x] = in[y, floor(x + 0.5 + 0.5·(y + 0.5))]: offsets 0, 1, 1, 2 for rows 0..3
    assert aa.shear_x(g, 0.5)[0, 0].tolist() == [[0, 1, 2, 3], [5, 6, 7, f], [9, 10, 11, f], [14, 15, f, f]]
    # ShearY 0.5: the same along the columns
    assert torch.equal(aa.shear_y(g.transpose(2, 3), 0.5), aa.shear_x(g, 0.5).transpose(2, 3))
    # negative shear: offsets floor(0.5 - 0.5·(y + 0.5)) = 0, -1, -1, -2, the fill comes in from the left
    assert aa.shear_x(g, -0.5)[0, 0].tolist() == [[0, 1, 2, 3], [f, 4, 5, 6], [f, 8, 9, 10], [f, f, 12, 13]]
    # translations: out[.., x] = in[.., x - t]; magnitudes are truncated to whole pixels
    assert aa.translate_x(g, 1)[0, 0].tolist() == [[f, 0, 1, 2], [f, 4, 5, 6], [f, 8, 9, 10], [f, 12, 13, 14]]
    assert torch.equal(aa.translate_x(g, 1.9), aa.translate_x(g, 1))
    assert aa.translate_y(g, -2)[0, 0].tolist() == [[8, 9, 10, 11], [12, 13, 14, 15], [f] * 4, [f] * 4]
    # rotation: 90 degrees counter-clockwise is rot90; 0 degrees is the identity
    assert torch.equal(aa.rotate(g, 90.0), torch.rot90(g, 1, dims=(2, 3)))
    assert torch.equal(aa.rotate(g, -90.0), torch.rot90(g, -1, dims=(2, 3)))
    assert torch.equal(aa.rotate(g, 0.0), g)
    # per-image magnitudes in one call
    two = torch.cat([g, g])
    out = aa.translate_x(two, torch.tensor([1.0, -1.0]))
    assert torch.equal(out[:1], aa.translate_x(g, 1)) and torch.equal(out[1:], aa.translate_x(g, -1))


def test_cutout_zeroes_a_clipped_box():
    img = torch.full((64, 3, 12, 12), 255, dtype=torch.uint8)
    out = aa.cutout(img, 8, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    cy, cx = torch.randint(0, 12, (64, 1, 1), generator=g), torch.randint(0, 12, (64, 1, 1), generator=g)
    for i in range(64):
        zero = out[i, 0] == 0
        rows, cols = zero.any(1).nonzero().flatten(), zero.any(0).nonzero().flatten()
        y1, y2 = max(int(cy[i]) - 4, 0), min(int(cy[i]) + 4, 12)
        x1, x2 = max(int(cx[i]) - 4, 0), min(int(cx[i]) + 4, 12)
        assert int(zero.sum()) == (y2 - y1) * (x2 - x1)  # a clipped 8x8 box ...
        assert rows.tolist() == list(range(y1, y2)) and cols.tolist() == list(range(x1, x2))  # ... at the centre
        assert torch.equal(out[i, 0] == 0, out[i, 2] == 0)  # the same box in every channel
    assert torch.equal(aa.cutout(img, 0, g), img)


# ---- the policy applied to a batch --------------------------------------------------------------
_SINGLE = {
    "ShearX": aa.shear_x, "ShearY": aa.shear_y, "TranslateX": aa.translate_x, "TranslateY": aa.translate_y,
    "Rotate": aa.rotate, "Solarize": aa.solarize, "Posterize": aa.posterize,
    "AutoContrast": lambda x, m: aa.autocontrast(x), "Invert": lambda x, m: aa.invert(x),
    "Equalize": lambda x, m: aa.equalize(x),
    "Contrast": lambda x, m: aa.contrast(x, 1 + m), "Color": lambda x, m: aa.color(x, 1 + m),
    "Brightness": lambda x, m: aa.brightness(x, 1 + m), "Sharpness": lambda x, m: aa.sharpness(x, 1 + m),
}


def _reference(images: torch.Tensor, seed: int) -> torch.Tensor:
    """The policy one image at a time from the single-op functions, replaying the batched draws."""
    g = torch.Generator().manual_seed(seed)
    b, _, h, w = images.shape
    sub = torch.randint(0, 25, (b,), generator=g)
    u = torch.rand((b, 2), generator=g)
    signs = torch.randint(0, 2, (b, 2), generator=g).float() * 2 - 1
    out = []
    for i in range(b):
        x = images[i:i + 1]
        for k, (name, p, level) in enumerate(aa.CIFAR10_POLICY[int(sub[i])]):
            if u[i, k] < p:
                m = torch.tensor([aa.magnitude(name, level, h, w)])  # float32, as the batched tables
                m = m * signs[i, k] if name in aa.SIGNED else m
                x = _SINGLE[name](x, m)
        out.append(x)
    return torch.cat(out)


def test_batched_policy_equals_the_per_image_reference():
    images = torch.randint(0, 256, (300, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    images[:20] = images[:20] // 4 + 60  # low-contrast images: AutoContrast / Equalize do something visible
    batched = aa.autoaugment(images, torch.Generator().manual_seed(5))
    assert torch.equal(batched, _reference(images, 5))
    changed = (batched != images).flatten(1).any(1).float().mean().item()
    assert 0.3 < changed < 0.9  # most sub-policies apply something to most images, not all


def test_policy_is_deterministic_given_the_generator():
    images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    a = aa.autoaugment(images, torch.Generator().manual_seed(7))
    b = aa.autoaugment(images, torch.Generator().manual_seed(7))
    c = aa.autoaugment(images, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.uint8 and a.shape == images.shape


def test_probabilities_of_a_custom_policy():
    images = torch.randint(0, 256, (400, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    always = ((("Invert", 1.0, None), ("Invert", 0.0, None)),)
    assert torch.equal(aa.autoaugment(images, torch.Generator().manual_seed(0), always), 255 - images)
    twice = ((("Invert", 1.0, None), ("Invert", 1.0, None)),)
    assert torch.equal(aa.autoaugment(images, torch.Generator().manual_seed(0), twice), images)
    half = ((("Invert", 0.5, None), ("Invert", 0.0, None)),)
    inverted = (aa.autoaugment(images, torch.Generator().manual_seed(0), half) != images).flatten(1).any(1)
    assert 0.4 < inverted.float().mean().item() < 0.6


def test_no_host_sync_in_the_augmentation_modules():
    """No .item()/.tolist()/.cpu()/bool()/int()/float() of a tensor on the batch path (a source check)."""
    for name in ("autoaugment.py", "cutmix.py", "batch_augment.py"):
        tree = ast.parse((SRC / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                assert node.attr not in ("item", "tolist", "cpu", "numpy", "nonzero"), (name, node.lineno)


# ---- CutMix -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_image", [False, True])
def test_cutmix_label_weights_equal_the_pasted_areas(per_image):
    b, k = 12, 12
    # image i is filled with the value 10·i, so every pixel tells which image it came from
    images = (torch.arange(b, dtype=torch.uint8) * 10).view(b, 1, 1, 1).expand(b, 3, 16, 16).contiguous()
    labels = torch.arange(b)
    areas = []
    for seed in range(6):
        mixed, soft = cutmix(images, labels, k, torch.Generator().manual_seed(seed), per_image=per_image)
        assert soft.shape == (b, k) and soft.dtype == torch.float32
        assert torch.allclose(soft.sum(1), torch.ones(b))
        for i in range(b):
            for j in range(b):  # the label weight of class j = the fraction of image i's pixels from image j
                frac = (mixed[i, 0] == 10 * j).float().mean().item()
                assert soft[i, j].item() == pytest.approx(frac, abs=1e-6)
            assert torch.equal(mixed[i, 0] == mixed[i, 0, 0, 0], mixed[i, 2] == mixed[i, 2, 0, 0])
        pasted = 1 - soft[torch.arange(b), labels]  # 0 where the partner is the image itself
        areas.append(pasted[pasted > 0])
    if not per_image:  # one box per batch (the release): every image pasted the same area
        assert all(torch.allclose(a, a[:1].expand_as(a)) for a in areas if a.numel())
    else:
        assert any(len(set(a.tolist())) > 1 for a in areas)


def test_cutmix_box_follows_the_release_formula():
    g = torch.Generator().manual_seed(4)
    y1, y2, x1, x2 = cutmix_boxes(200, 32, 32, g, "cpu")
    g = torch.Generator().manual_seed(4)
    lam = torch.rand((200,), generator=g)
    cx, cy = torch.randint(0, 32, (200,), generator=g), torch.randint(0, 32, (200,), generator=g)
    for i in range(200):
        side = int(32 * math.sqrt(1 - lam[i].item()))
        assert (int(x1[i]), int(x2[i])) == (min(max(int(cx[i]) - side // 2, 0), 32), min(int(cx[i]) + side // 2, 32))
        assert (int(y1[i]), int(y2[i])) == (max(int(cy[i]) - side // 2, 0), min(int(cy[i]) + side // 2, 32))


def test_cutmix_mixes_soft_labels_and_is_deterministic():
    images = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    hard = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    a = cutmix(images, hard, 3, torch.Generator().manual_seed(9))
    b = cutmix(images, F.one_hot(hard, 3).float(), 3, torch.Generator().manual_seed(9))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = cutmix(images, hard, 3, torch.Generator().manual_seed(10))
    assert not torch.equal(a[0], c[0])


# ---- the loader: start epoch, byte-identical when off ---------------------------------------------
def _dataset(n: int = 40, k: int = 4) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    return ArrayDataset(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=g),
                        torch.arange(n) % k, [str(i) for i in range(k)])


def _epoch(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def _same(a, b) -> bool:
    return all(torch.equal(x, u) and torch.equal(y, v) for (x, y), (u, v) in zip(a, b, strict=True))


def test_autoaugment_starts_at_its_epoch_and_off_is_byte_identical():
    ds = _dataset()
    plain = DeviceLoader(ds, 16, augment=True, padding=2, seed=3)
    off = DeviceLoader(ds, 16, augment=True, padding=2, seed=3, batch_augment=BatchAugment())
    late = DeviceLoader(ds, 16, augment=True, padding=2, seed=3,
                        batch_augment=BatchAugment(autoaugment=True, autoaugment_start_epoch=2))
    for e in (0, 1):
        assert _same(_epoch(plain, e), _epoch(off, e)) and _same(_epoch(plain, e), _epoch(late, e))
    on = _epoch(late, 2)
    base = _epoch(plain, 2)
    # the first batch's crop/flip draws come first, so AutoAugment acts on the very same cropped batch
    assert not torch.equal(on[0][0], base[0][0])
    assert torch.equal(on[0][1], base[0][1]) and on[0][0].dtype == torch.float32
    assert _same(on, _epoch(late, 2))  # a pure function of (seed, epoch)
    # what AutoAugment + Cutout did to the first batch, by hand from the same generator
    gen = plain.augmentation_generator()
    x = next(iter(plain.uint8_batches()))[0]
    x = aa.cutout(aa.autoaugment(random_crop_flip(x, 2, True, gen), gen), 4, gen)  # None: half the side
    assert torch.equal(on[0][0], x.float() / 255)


def test_autoaugment_draws_each_view_separately():
    loader = DeviceLoader(_dataset(), 8, augment=False, seed=0, views=2,
                          batch_augment=BatchAugment(autoaugment=True, cutout=0))
    for x, y in _epoch(loader, 0):
        b = y.shape[0] // 2
        assert x.shape[0] == 2 * b and torch.equal(y[:b], y[b:])
        assert not torch.equal(x[:b], x[b:])  # same images, independent sub-policies


def test_loader_with_cutmix_yields_soft_labels():
    ds = _dataset()
    loader = DeviceLoader(ds, 16, augment=True, padding=2, seed=0,
                          batch_augment=BatchAugment(cutmix=True, num_classes=4))
    batches = _epoch(loader, 0)
    assert [tuple(y.shape) for _, y in batches] == [(16, 4), (16, 4), (8, 4)]
    for _, y in batches:
        assert y.dtype == torch.float32 and torch.allclose(y.sum(1), torch.ones(len(y)))
    assert _same(batches, _epoch(loader, 0))
    with pytest.raises(InputError):
        BatchAugment(cutmix=True)


# ---- soft labels through training -------------------------------------------------------------------
def _run_data(n_train: int = 64, n_test: int = 32) -> RunData:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (n_train + n_test,), generator=g)
    images = (torch.rand(n_train + n_test, 1, 8, 8, generator=g) * 120 + labels.view(-1, 1, 1, 1) * 40)
    images = images.clamp(0, 255).to(torch.uint8)
    classes = ["a", "b", "c", "d"]
    return RunData(ArrayDataset(images[:n_train], labels[:n_train], classes),
                   ArrayDataset(images[n_train:], labels[n_train:], classes), 4, 1, 1, False, None, None)


def _cfg(**extra):
    base = {"data": {"dataset": "digits", "batch_size": 32, "cutmix": True, "autoaugment": True},
            "model": {"arch": "small_cnn"}, "attack": {"eps": "16/255", "step_size": "8/255", "steps": 2},
            "optim": {"epochs": 2, "lr": 0.05, "milestones": [1]}, "eval": {"n_examples": 32, "steps": 2},
            "device": "cpu"}
    return build_config(None, None, [base, *[{k: v} for k, v in extra.items()]])


def test_pgd_at_attack_loss_is_the_mixed_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    y, y_perm = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 3, 0, 1, 1, 1])
    area = torch.tensor([0.0, 0.25, 0.5, 0.1, 1.0, 0.3])
    soft = (1 - area)[:, None] * F.one_hot(y, 4) + area[:, None] * F.one_hot(y_perm, 4)
    by_hand = sum((1 - area[i]) * F.cross_entropy(logits[i:i + 1], y[i:i + 1], reduction="sum")
                  + area[i] * F.cross_entropy(logits[i:i + 1], y_perm[i:i + 1], reduction="sum") for i in range(6))
    assert cross_entropy_sum(logits, soft).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_cutmix_pgd_at_trains_and_the_step_sees_soft_labels(tmp_path):
    cfg = _cfg()
    t = Trainer(cfg, tmp_path / "run", data=_run_data(), progress=False, log=lambda m: None)
    seen, real = [], t.objective.step

    def spy(model, x, y, *args, **kwargs):
        seen.append(y.clone())
        return real(model, x, y, *args, **kwargs)

    t.objective.step = spy
    summary = t.fit()
    assert summary["epochs"] == 2 and len(seen) == 4
    assert all(y.shape == (32, 4) and y.dtype == torch.float32 for y in seen)
    assert any((y.max(1).values < 1).any() for y in seen)  # some rows really are mixed
    # the PGD-AT loss of a mixed batch is the probability-weighted CE, by hand
    x, soft = torch.rand(4, 1, 8, 8), seen[0][:4]
    x_adv = (x + 0.05).clamp(0, 1)
    t.model.eval()
    loss, terms = cfg.objective().loss(t.model, x, soft, x_adv, 0)
    by_hand = (-(soft * F.log_softmax(t.model(x_adv), 1)).sum(1)).mean()
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


def test_resume_with_autoaugment_and_cutmix_equals_uninterrupted(tmp_path, monkeypatch):
    cfg = _cfg(optim={"epochs": 3, "milestones": [2]}, data={"autoaugment_start_epoch": 1})
    quiet = {"progress": False, "log": lambda m: None}
    Trainer(cfg, tmp_path / "a", data=_run_data(), **quiet).fit()
    t = Trainer(cfg, tmp_path / "b", data=_run_data(), **quiet)
    calls, real = {"n": 0}, t.objective.step

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # second step of epoch 2 (0-based 1), the first epoch with AutoAugment
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(t.objective, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        t.fit()
    assert torch.load(tmp_path / "b" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    Trainer(cfg, tmp_path / "b", resume=True, data=_run_data(), **quiet).fit()
    wa = torch.load(tmp_path / "a" / "final.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "final.pt", weights_only=True)["model"]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def test_cutmix_under_the_cuda_graph_stand_in_matches_eager(tmp_path):
    data = _run_data()
    eager = Trainer(_cfg(), tmp_path / "a", data=data, progress=False, log=lambda m: None)
    eager.fit()
    graph = Trainer(_cfg(speed={"cuda_graph": "eager"}), tmp_path / "b", data=data, progress=False,
                    log=lambda m: None)
    graph.fit()
    for (k, a), b in zip(eager.model.state_dict().items(), graph.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_cutmix_refused_for_methods_that_index_the_label():
    with pytest.raises(InputError, match="MART's boosted CE"):
        _cfg(method={"name": "mart"})
    with pytest.raises(InputError, match="Consistency-AT"):
        _cfg(method={"name": "consistency_at"})
    _cfg(method={"name": "trades"})  # TRADES' KL needs no labels; its CE takes probabilities
    _cfg(rebat={"enabled": True}, averaging={"enabled": True})  # the teacher term needs no labels either


def test_bad_augment_keys_refused_at_config_time():
    with pytest.raises(InputError, match="autoaugment_start_epoch=2 .* AutoAugment would never run"):
        _cfg(data={"autoaugment": True, "autoaugment_start_epoch": 2})
    with pytest.raises(InputError, match="data.autoaugment_cutout must be an integer >= 0"):
        _cfg(data={"autoaugment_cutout": -1})
    assert _cfg(data={"autoaugment_start_epoch": 1}).data.autoaugment_start_epoch == 1


def test_rpat_train_mart_with_cutmix_exits_2(capsys):
    code = main(["train", "--method", "mart", "data.cutmix=true", "--print-config"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("rpat: error: data.cutmix") and "method.name=mart" in err[0]

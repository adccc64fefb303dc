"""Common corruptions: the official CIFAR-C / Tiny-ImageNet-C layouts, accuracy per corruption, downloads."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import rpat.data.corruptions as cmod
import rpat.data.datasets as dmod
from rpat.cli import main
from rpat.data import (
    CORRUPTIONS,
    check_corruption_folder,
    corruption_split,
    download_corruption_set,
    list_corruptions,
)
from rpat.errors import InputError
from rpat.evaluation.corruptions import evaluate_corruptions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_data import _Server  # noqa: E402  (the loopback server of the CIFAR download tests)

PER = 4  # images per severity (10,000 in the release)


# ---------------------------------------------------------------------------------------
# builders of small sets in the official layouts


def _pixels(names: list[str], n_classes: int, per: int = PER, seed: int = 0) -> dict[str, np.ndarray]:
    """``{name: (5 * per, 32, 32, 3) uint8}``; pixel [0, 0, 0] of each row is the class the fake model predicts."""
    rng = np.random.default_rng(seed)
    out = {}
    for name in names:
        arr = rng.integers(0, 256, (5 * per, 32, 32, 3), dtype=np.uint8)
        arr[:, 0, 0, 0] = rng.integers(0, n_classes, 5 * per)
        out[name] = arr
    return out


def make_cifar_c(folder: Path, names: list[str] | None = None, n_classes: int = 10, per: int = PER,
                 seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``folder/<name>.npy`` for each name (default the 15) and ``folder/labels.npy``; returns (labels, arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = list(CORRUPTIONS) if names is None else names
    rng = np.random.default_rng(seed + 1)
    labels = np.tile(rng.integers(0, n_classes, per), 5).astype(np.uint8)  # as released: the test labels x 5
    np.save(folder / "labels.npy", labels)
    arrays = _pixels(names, n_classes, per, seed)
    for name, arr in arrays.items():
        np.save(folder / f"{name}.npy", arr)
    return labels, arrays


class PixelModel(nn.Module):
    """Predicts class ``round(255 * x[:, 0, 0, 0]) % n_classes``: accuracies are hand-computable."""

    def __init__(self, n_classes: int = 10) -> None:
        super().__init__()
        self.n_classes = n_classes
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pred = (x[:, 0, 0, 0] * 255).round().long() % self.n_classes
        return nn.functional.one_hot(pred, self.n_classes).float() + 0 * self.dummy


def _jpeg(color: tuple[int, int, int], size: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_tiny_c(folder: Path, names: tuple[str, ...] = ("fog", "snow"),
                wnids: tuple[str, ...] = ("n003", "n001", "n002")) -> dict[tuple[str, int], list[tuple[str, int]]]:
    """``folder/<name>/<sev>/<wnid>/*.JPEG``, 2 images per class; returns the expected (wnid, red) per split."""
    expected = {}
    for ci, name in enumerate(names):
        for sev in range(1, 6):
            items = []
            for wi, w in enumerate(wnids):
                d = folder / name / str(sev) / w
                d.mkdir(parents=True)
                for j in (1, 0):  # written in reverse name order
                    red = 20 * (wi * 2 + j) + 10 * sev + 3 * ci
                    (d / f"{w}_{j}.JPEG").write_bytes(_jpeg((red, 100, 50)))
                    items.append((w, f"{w}_{j}", red))
            expected[(name, sev)] = [(w, red) for w, _, red in sorted(items)]
    return expected


# ---------------------------------------------------------------------------------------
# CIFAR-C reading


def test_cifar10_c_split_reads_the_severity_rows(tmp_path):
    labels, arrays = make_cifar_c(tmp_path / "CIFAR-10-C")
    for root in (tmp_path, tmp_path / "CIFAR-10-C"):  # the parent or the folder itself
        for sev in (1, 3, 5):
            ds = corruption_split(root, "cifar10", "fog", sev)
            rows = slice((sev - 1) * PER, sev * PER)
            assert ds.images.dtype == torch.uint8 and ds.images.shape == (PER, 3, 32, 32)
            assert torch.equal(ds.images, torch.from_numpy(arrays["fog"][rows].transpose(0, 3, 1, 2).copy()))
            assert ds.labels.tolist() == labels[rows].tolist()
            assert ds.classes == [str(k) for k in range(10)]
    first2 = corruption_split(tmp_path, "cifar10-c", "fog", 4, n_examples=2)
    assert torch.equal(first2.images, torch.from_numpy(arrays["fog"][3 * PER:3 * PER + 2].transpose(0, 3, 1, 2).copy()))
    assert len(corruption_split(tmp_path, "cifar10", "fog", 2, n_examples=99)) == PER


def test_split_is_memory_mapped(tmp_path, monkeypatch):
    make_cifar_c(tmp_path, ["fog"])
    modes = []
    real = np.load

    def spy(*a, **k):
        modes.append(k.get("mmap_mode"))
        return real(*a, **k)

    monkeypatch.setattr(cmod.np, "load", spy)
    corruption_split(tmp_path, "cifar10", "fog", 1)
    assert modes and set(modes) == {"r"}


def test_missing_files_are_one_error_naming_them(tmp_path):
    folder = tmp_path / "CIFAR-10-C"
    make_cifar_c(folder)
    for name in ("fog", "snow", "frost"):
        (folder / f"{name}.npy").unlink()
    (folder / "labels.npy").unlink()
    with pytest.raises(InputError) as e:
        check_corruption_folder(tmp_path, "cifar10")
    msg = str(e.value)
    assert "\n" not in msg
    assert f"CIFAR-10-C folder {folder} lacks labels.npy and 3 of the 15 corruption files " \
           f"(snow.npy, frost.npy, fog.npy)" in msg
    assert "50000x32x32x3 uint8" in msg and "rpat download cifar10-c --root" in msg
    # a folder that is not there at all
    with pytest.raises(InputError, match="does not exist.*lacks labels.npy and 15 of the 15"):
        check_corruption_folder(tmp_path / "nowhere", "cifar100")
    # a folder holding neither the set nor a CIFAR-10-C/ folder
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty \(nor a CIFAR-10-C/ folder in it\) lacks labels.npy and 15 of"):
        check_corruption_folder(tmp_path / "empty", "cifar10")
    # one asked-for corruption
    with pytest.raises(InputError, match=r"lacks labels.npy and 1 of the 1 asked-for corruption files \(fog.npy\)"):
        corruption_split(tmp_path, "cifar10", "fog", 1)


def test_extras_are_read_only_when_asked(tmp_path):
    make_cifar_c(tmp_path, [*CORRUPTIONS, "saturate"])
    assert list_corruptions(tmp_path, "cifar10") == [*CORRUPTIONS, "saturate"]
    check_corruption_folder(tmp_path, "cifar10")  # the 15 are there: fine without the other extras
    with pytest.raises(InputError, match=r"1 of the 2 asked-for corruption files \(spatter.npy\)"):
        check_corruption_folder(tmp_path, "cifar10", ["saturate", "spatter"])
    assert len(corruption_split(tmp_path, "cifar10", "saturate", 5)) == PER
    with pytest.raises(InputError, match="unknown corruption 'blur'"):
        corruption_split(tmp_path, "cifar10", "blur", 1)
    with pytest.raises(InputError, match="severity must be one of 1..5"):
        corruption_split(tmp_path, "cifar10", "fog", 6)


def test_wrong_shapes_and_label_counts_name_the_file(tmp_path):
    make_cifar_c(tmp_path, ["fog", "snow"])
    np.save(tmp_path / "fog.npy", np.zeros((5 * PER, 32, 32), np.uint8))
    with pytest.raises(InputError) as e:
        corruption_split(tmp_path, "cifar10", "fog", 1)
    msg = str(e.value)
    assert f"{tmp_path / 'fog.npy'} has shape 20x32x32 uint8, expected 20x32x32x3 uint8" in msg and "\n" not in msg
    np.save(tmp_path / "snow.npy", np.zeros((5 * PER + 5, 32, 32, 3), np.uint8))  # labels.npy has 20
    with pytest.raises(InputError, match=r"snow.npy has shape 25x32x32x3 uint8, expected 20x32x32x3"):
        corruption_split(tmp_path, "cifar10", "snow", 1)
    np.save(tmp_path / "labels.npy", np.zeros(7, np.int64))  # not 5 severities
    with pytest.raises(InputError, match=r"labels.npy has shape \(7,\) int64, expected \(50000,\) int"):
        corruption_split(tmp_path, "cifar10", "snow", 1)
    np.save(tmp_path / "labels.npy", np.full(5 * PER, 10, np.int64))
    np.save(tmp_path / "snow.npy", np.zeros((5 * PER, 32, 32, 3), np.uint8))
    with pytest.raises(InputError, match=r"labels outside 0..9"):
        corruption_split(tmp_path, "cifar10", "snow", 1)
    (tmp_path / "snow.npy").write_bytes(b"not numpy")
    with pytest.raises(InputError, match="cannot read .*snow.npy"):
        corruption_split(tmp_path, "cifar10", "snow", 1)


# ---------------------------------------------------------------------------------------
# Tiny-ImageNet-C reading


def test_tiny_imagenet_c_tree(tmp_path):
    folder = tmp_path / "Tiny-ImageNet-C"
    expected = make_tiny_c(folder)
    for sev in (1, 5):
        ds = corruption_split(tmp_path, "tiny-imagenet", "snow", sev)
        assert ds.classes == ["n001", "n002", "n003"]  # sorted wnids, as Tiny-ImageNet's classes
        exp = expected[("snow", sev)]
        assert ds.images.shape == (6, 3, 64, 64) and ds.images.dtype == torch.uint8
        assert ds.labels.tolist() == [ds.classes.index(w) for w, _ in exp] == [0, 0, 1, 1, 2, 2]
        assert (ds.images[:, 0, 32, 32].int() - torch.tensor([r for _, r in exp])).abs().max() <= 4
    sub = corruption_split(folder, "tiny-imagenet", "fog", 2, n_examples=4)
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(0))[:4].tolist()  # rpat's class-mixed order
    full = corruption_split(folder, "tiny-imagenet", "fog", 2)
    assert torch.equal(sub.images, full.images[perm]) and sub.labels.tolist() == full.labels[perm].tolist()
    assert list_corruptions(tmp_path, "tiny-imagenet") == ["snow", "fog"]
    with pytest.raises(InputError) as e:
        check_corruption_folder(tmp_path, "tiny-imagenet")
    msg = str(e.value)
    assert "lacks 13 of the 15 corruption folders (gaussian_noise/, " in msg and "\n" not in msg
    assert "<corruption>/<severity 1-5>/<class wnid>/*.JPEG" in msg and "zenodo.org/records/2536630" in msg
    (folder / "fog" / "4" / "n002").rename(folder / "fog" / "4" / "n009")
    with pytest.raises(InputError, match=r"fog/4 and .*fog/1 hold different class folders \(n002, n009\)"):
        corruption_split(tmp_path, "tiny-imagenet", "fog", 1)
    shutil.rmtree(folder / "snow" / "3")
    with pytest.raises(InputError, match=r"snow lacks the severity folders 3/"):
        corruption_split(tmp_path, "tiny-imagenet", "snow", 1)


# ---------------------------------------------------------------------------------------
# evaluation


def _expected_acc(arrays: dict[str, np.ndarray], labels: np.ndarray, name: str, rows: slice) -> float:
    pred = arrays[name][rows, 0, 0, 0].astype(np.int64) % 10
    return 100.0 * float(np.mean(pred == labels[rows].astype(np.int64)))


def test_evaluate_corruptions_hand_computed(tmp_path):
    labels, arrays = make_cifar_c(tmp_path / "CIFAR-10-C", per=6, seed=3)
    lines: list[str] = []
    rep = evaluate_corruptions(PixelModel(), tmp_path, "cifar10", batch_size=4, log=lines.append)
    assert list(rep["corruptions"]) == list(CORRUPTIONS) and rep["corruption_images"] == 6
    assert rep["corruption_set"] == "CIFAR-10-C" and len(lines) == 15
    for name in CORRUPTIONS:
        accs = rep["corruptions"][name]
        assert list(accs) == ["1", "2", "3", "4", "5", "all"]
        for sev in range(1, 6):
            assert accs[str(sev)] == pytest.approx(_expected_acc(arrays, labels, name, slice((sev - 1) * 6, sev * 6)))
        assert accs["all"] == pytest.approx(_expected_acc(arrays, labels, name, slice(0, 30)))
    cells = [rep["corruptions"][c][str(s)] for c in CORRUPTIONS for s in range(1, 6)]
    assert rep["corruption_acc"] == pytest.approx(np.mean(cells))
    assert rep["mce"] == pytest.approx(100 - np.mean([rep["corruptions"][c]["all"] for c in CORRUPTIONS]))
    assert 0 < rep["corruption_acc"] < 100  # random pixels: neither all right nor all wrong


def test_evaluate_corruptions_controlled_accuracies(tmp_path):
    """fog right on every image, snow right on severities 1-2 only: exact numbers."""
    folder = tmp_path / "CIFAR-10-C"
    folder.mkdir()
    labels = np.tile(np.arange(4), 5).astype(np.int64)
    np.save(folder / "labels.npy", labels)
    fog = np.zeros((20, 32, 32, 3), np.uint8)
    fog[:, 0, 0, 0] = labels  # the model predicts the label
    snow = fog.copy()
    snow[8:, 0, 0, 0] = (labels[8:] + 1) % 10  # wrong from severity 3 on
    np.save(folder / "fog.npy", fog)
    np.save(folder / "snow.npy", snow)
    rep = evaluate_corruptions(PixelModel(), folder, "cifar10", corruptions=["fog", "snow"], n_examples=3)
    assert rep["corruption_images"] == 3
    assert rep["corruptions"]["fog"] == {"1": 100.0, "2": 100.0, "3": 100.0, "4": 100.0, "5": 100.0, "all": 100.0}
    assert rep["corruptions"]["snow"] == {"1": 100.0, "2": 100.0, "3": 0.0, "4": 0.0, "5": 0.0, "all": 40.0}
    assert rep["corruption_acc"] == pytest.approx(70.0) and rep["mce"] == pytest.approx(30.0)
    with pytest.raises(InputError, match="lacks 13 of the 15 corruption files"):
        evaluate_corruptions(PixelModel(), folder, "cifar10")  # checked before evaluating anything


def test_a_stopped_corruption_evaluation_recomputes_only_the_unfinished_corruption(tmp_path):
    """Stopped inside the 3rd corruption, the rerun with the same stages file evaluates corruptions 3..15
    only, and the report equals the uninterrupted one (seconds aside)."""
    from rpat.evaluation.stages import Stages

    make_cifar_c(tmp_path / "CIFAR-10-C", per=4, seed=1)
    whole = evaluate_corruptions(PixelModel(), tmp_path, "cifar10", batch_size=4)
    path, settings = tmp_path / "r.stages.json", {"corruptions": "same"}

    class Stops(PixelModel):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Stops.calls += 1
            if Stops.calls > 2 * 5:  # each corruption: 5 severities, one batch each
                raise KeyboardInterrupt
            return super().forward(x)

    with pytest.raises(KeyboardInterrupt):
        evaluate_corruptions(Stops(), tmp_path, "cifar10", batch_size=4, stages=Stages(path, settings))
    done = json.loads(path.read_text())["stages"]
    assert sorted(done) == sorted(f"corruption:{c}" for c in CORRUPTIONS[:2])

    class Counts(PixelModel):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            Counts.calls += 1
            return super().forward(x)

    stages = Stages(path, settings)
    again = evaluate_corruptions(Counts(), tmp_path, "cifar10", batch_size=4, stages=stages)
    assert Counts.calls == 13 * 5 and stages.resumed == [f"corruption:{c}" for c in CORRUPTIONS[:2]]
    for key in ("corruptions", "corruption_acc", "mce", "corruption_images"):
        assert again[key] == whole[key], key
    # other settings: the file is not used
    fresh = Stages(path, {"corruptions": "other"})
    assert fresh.discarded and fresh.get("corruption:" + CORRUPTIONS[0]) is None


class ConstantModel(nn.Module):
    """Always predicts class ``k`` (of ``n_classes``)."""

    def __init__(self, k: int, n_classes: int) -> None:
        super().__init__()
        self.k, self.n_classes = k, n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot(torch.full((x.shape[0],), self.k), self.n_classes).float()


def test_evaluate_tiny_imagenet_c(tmp_path):
    make_tiny_c(tmp_path / "Tiny-ImageNet-C")  # 3 classes x 2 images per severity
    rep = evaluate_corruptions(ConstantModel(1, 3), tmp_path, "tiny-imagenet", corruptions=["fog", "snow"])
    assert rep["corruption_set"] == "Tiny-ImageNet-C" and rep["corruption_images"] == 6
    for name in ("fog", "snow"):
        assert rep["corruptions"][name] == pytest.approx({**{str(s): 100 / 3 for s in range(1, 6)}, "all": 100 / 3})
    assert rep["corruption_acc"] == pytest.approx(100 / 3) and rep["mce"] == pytest.approx(200 / 3)
    sub = evaluate_corruptions(ConstantModel(1, 3), tmp_path, "tiny-imagenet", corruptions=["fog"], n_examples=4)
    assert sub["corruption_images"] == 4


# ---------------------------------------------------------------------------------------
# downloads


@pytest.fixture()
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _tar_of(folder: Path, dest: Path, arcname: str) -> Path:
    with tarfile.open(dest, "w") as tf:
        tf.add(folder, arcname=arcname)
    return dest


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def test_download_cifar10_c_from_mirror_then_read(tmp_path, monkeypatch, capsys):
    labels, arrays = make_cifar_c(tmp_path / "src" / "CIFAR-10-C")
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    tar = _tar_of(tmp_path / "src" / "CIFAR-10-C", mirror / "CIFAR-10-C.tar", "CIFAR-10-C")
    monkeypatch.setitem(cmod.CORRUPTION_SETS, "cifar10-c",
                        dataclasses.replace(cmod.CORRUPTION_SETS["cifar10-c"], md5=_md5(tar)))
    monkeypatch.setenv("RPAT_MIRROR", mirror.as_uri())
    root = tmp_path / "data"
    assert main(["download", "cifar10-c", "--root", str(root), "--no-progress"]) == 0
    assert f"cifar10-c: {root / 'CIFAR-10-C'} (checked)" in capsys.readouterr().out
    assert sorted(p.name for p in root.iterdir()) == ["CIFAR-10-C"]  # the tar and the temporary folder are gone
    ds = corruption_split(root, "cifar10", "jpeg_compression", 5)
    assert ds.labels.tolist() == labels[4 * PER:].tolist()
    assert torch.equal(ds.images, torch.from_numpy(arrays["jpeg_compression"][4 * PER:].transpose(0, 3, 1, 2).copy()))
    # complete already: nothing fetched (the mirror may be gone)
    monkeypatch.setenv("RPAT_MIRROR", (tmp_path / "gone").as_uri())
    assert download_corruption_set("cifar10-c", root, progress=False) == root / "CIFAR-10-C"


def test_download_cifar100_c_http_fills_a_partial_folder(tmp_path, server, monkeypatch):
    make_cifar_c(tmp_path / "src" / "CIFAR-100-C", n_classes=100)
    tar = _tar_of(tmp_path / "src" / "CIFAR-100-C", tmp_path / "CIFAR-100-C.tar", "CIFAR-100-C")
    server.routes["/records/CIFAR-100-C.tar"] = (200, tar.read_bytes(), None)
    monkeypatch.setitem(cmod.CORRUPTION_SETS, "cifar100-c", dataclasses.replace(
        cmod.CORRUPTION_SETS["cifar100-c"], url=f"{server.base}/records/CIFAR-100-C.tar", md5=_md5(tar)))
    root = tmp_path / "data"
    make_cifar_c(root / "CIFAR-100-C", ["fog"], n_classes=100, seed=9)  # an earlier, partial copy
    (root / "CIFAR-100-C" / "mine.txt").write_text("kept")
    out = download_corruption_set("cifar100-c", root, progress=False, keep_archive=True)
    assert out == root / "CIFAR-100-C" and (root / "CIFAR-100-C.tar").is_file()
    assert (out / "mine.txt").read_text() == "kept"
    assert (out / "fog.npy").read_bytes() == (tmp_path / "src" / "CIFAR-100-C" / "fog.npy").read_bytes()
    check_corruption_folder(root, "cifar100")


def test_download_wrong_checksum_leaves_nothing(tmp_path, server, monkeypatch, capsys):
    make_cifar_c(tmp_path / "src" / "CIFAR-10-C", ["fog"])
    tar = _tar_of(tmp_path / "src" / "CIFAR-10-C", tmp_path / "CIFAR-10-C.tar", "CIFAR-10-C")
    server.routes["/CIFAR-10-C.tar"] = (200, tar.read_bytes(), None)
    monkeypatch.setenv("RPAT_MIRROR", server.base)  # the official md5 does not match the small tar
    root = tmp_path / "data"
    assert main(["download", "cifar10-c", "--root", str(root), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"rpat: error: checksum mismatch for {server.base}/CIFAR-10-C.tar: expected md5 "
                          f"56bf5dcef84df0e2308c6dcbcbbd8499, got {_md5(tar)}")
    assert not root.exists() or list(root.iterdir()) == []


def test_download_refuses_unsafe_tar_members(tmp_path, monkeypatch):
    evil = tmp_path / "CIFAR-10-C.tar"
    with tarfile.open(evil, "w") as tf:
        info = tarfile.TarInfo("../escaped.npy")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    monkeypatch.setitem(cmod.CORRUPTION_SETS, "cifar10-c", dataclasses.replace(
        cmod.CORRUPTION_SETS["cifar10-c"], url=evil.as_uri(), md5=_md5(evil)))
    root = tmp_path / "data"
    with pytest.raises(InputError, match="unsafe member"):
        download_corruption_set("cifar10-c", root, progress=False)
    assert not (tmp_path / "escaped.npy").exists() and not (root / "escaped.npy").exists()
    assert [p.name for p in root.iterdir()] == ["CIFAR-10-C.tar"]  # left to inspect; no temporary folder


def test_download_a_tar_without_the_set_is_named(tmp_path, monkeypatch):
    make_cifar_c(tmp_path / "src" / "CIFAR-10-C", ["fog"])
    tar = _tar_of(tmp_path / "src" / "CIFAR-10-C", tmp_path / "CIFAR-10-C.tar", "CIFAR-10-C")
    monkeypatch.setitem(cmod.CORRUPTION_SETS, "cifar10-c", dataclasses.replace(
        cmod.CORRUPTION_SETS["cifar10-c"], url=tar.as_uri(), md5=_md5(tar)))
    with pytest.raises(InputError, match=r"CIFAR-10-C.tar does not hold the CIFAR-10-C release \(.*lacks 14 of "
                       r"the 15 corruption files"):
        download_corruption_set("cifar10-c", tmp_path / "data", progress=False)
    assert not (tmp_path / "data" / "CIFAR-10-C").exists()


def test_download_clean_archive(tmp_path, monkeypatch, capsys):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / "cifar-10-python.tar.gz").write_bytes(b"pretend archive")
    monkeypatch.setitem(dmod.DATASETS, "cifar10", dataclasses.replace(
        dmod.DATASETS["cifar10"], md5=hashlib.md5(b"pretend archive").hexdigest()))
    monkeypatch.setenv("RPAT_MIRROR", mirror.as_uri())
    assert main(["download", "cifar10", "--root", str(tmp_path / "d"), "--no-progress"]) == 0
    assert (tmp_path / "d" / "cifar-10-python.tar.gz").read_bytes() == b"pretend archive"
    assert "cifar10: " in capsys.readouterr().out

"""rpat.data: archives in the official formats, checked downloads, caching, device batches."""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import io
import os
import pickle
import shutil
import sys
import tarfile
import threading
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import rpat.data.load as loadmod
from rpat.data import (
    DATASETS,
    ArrayDataset,
    DeviceLoader,
    download_file,
    get_spec,
    load_dataset,
    random_crop_flip,
    resolve_url,
    spec_for,
)
from rpat.errors import InputError

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck"]


# ---------------------------------------------------------------------------------------
# builders of fake archives in the official formats


def _pickle(obj: dict) -> bytes:
    return pickle.dumps(obj, protocol=2)  # as the official (Python 2 era) files


def _write_tar_gz(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_cifar10(directory: Path, per_batch: int = 6, n_test: int = 7, seed: int = 0):
    """A small cifar-10-python.tar.gz; returns (path, {split: (data (N, 3072), labels)})."""
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    src: dict[str, list] = {"train": [[], []], "test": [[], []]}
    batches = [(f"data_batch_{i}", "train", per_batch) for i in range(1, 6)]
    for member, split, n in [*batches, ("test_batch", "test", n_test)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        members[f"cifar-10-batches-py/{member}"] = _pickle(
            {b"batch_label": member.encode(), b"labels": labels, b"data": data,
             b"filenames": [f"img{i}.png".encode() for i in range(n)]})
        src[split][0].append(data)
        src[split][1] += labels
    members["cifar-10-batches-py/batches.meta"] = _pickle(
        {b"label_names": [c.encode() for c in CIFAR10_CLASSES], b"num_vis": 3072,
         b"num_cases_per_batch": per_batch})
    members["cifar-10-batches-py/readme.html"] = b"<html></html>"
    path = _write_tar_gz(directory / "cifar-10-python.tar.gz", members)
    return path, {k: (np.concatenate(v[0]), np.array(v[1])) for k, v in src.items()}


def make_cifar100(directory: Path, n_train: int = 12, n_test: int = 5, seed: int = 1):
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    src = {}
    for split, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, n).tolist()
        members[f"cifar-100-python/{split}"] = _pickle(
            {b"filenames": [b"x"] * n, b"batch_label": split.encode(), b"fine_labels": fine,
             b"coarse_labels": [f // 5 for f in fine], b"data": data})
        src[split] = (data, np.array(fine))
    members["cifar-100-python/meta"] = _pickle(
        {b"fine_label_names": [f"fine{i:02d}".encode() for i in range(100)],
         b"coarse_label_names": [f"coarse{i:02d}".encode() for i in range(20)]})
    return _write_tar_gz(directory / "cifar-100-python.tar.gz", members), src


def _jpeg(color: tuple[int, int, int], mode: str = "RGB", size: int = 64) -> bytes:
    buf = io.BytesIO()
    fill = color if mode == "RGB" else color[0]
    Image.new(mode, (size, size), fill).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_tiny(directory: Path) -> tuple[Path, dict[str, list[tuple[str, tuple[int, int, int]]]]]:
    """A 3-class tiny-imagenet-200.zip; returns the path and the expected (wnid, color) per split.

    Each image is one solid color, unique per image, so decoded order can be checked.
    """
    wnids = ["n003", "n001", "n002"]  # unsorted on purpose: classes are the sorted ids
    p = "tiny-imagenet-200/"
    files: dict[str, bytes] = {f"{p}wnids.txt": ("\n".join(wnids) + "\n").encode(),
                               f"{p}words.txt": b"n001\tone\nn002\ttwo\nn003\tthree\n"}
    train: list[tuple[str, tuple[int, int, int]]] = []
    k = 0
    for w in wnids:
        for j in (1, 0):  # written in reverse name order
            color = (40 * k + 20, 200 - 30 * k, 90)
            k += 1
            files[f"{p}train/{w}/images/{w}_{j}.JPEG"] = _jpeg(color)
            train.append((w, f"{w}_{j}", color))
        files[f"{p}train/{w}/{w}_boxes.txt"] = b""
    # a grayscale JPEG, as in the real set
    files[f"{p}train/n002/images/n002_2.JPEG"] = _jpeg((128, 128, 128), mode="L")
    train.append(("n002", "n002_2", (128, 128, 128)))
    val = [("val_4.JPEG", "n002"), ("val_0.JPEG", "n003"), ("val_3.JPEG", "n001"),
           ("val_1.JPEG", "n002"), ("val_2.JPEG", "n001")]
    test = []
    ann = []
    for i, (fname, w) in enumerate(val):
        color = (250 - 40 * i, 30 * i, 160)
        files[f"{p}val/images/{fname}"] = _jpeg(color)
        ann.append(f"{fname}\t{w}\t0\t0\t63\t63")
        test.append((w, fname, color))
    files[f"{p}val/val_annotations.txt"] = ("\n".join(ann) + "\n").encode()
    files[f"{p}test/images/test_0.JPEG"] = _jpeg((1, 2, 3))
    path = directory / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    expected = {split: [(w, c) for w, _, c in sorted(items, key=lambda t: (t[0], t[1]))]
                for split, items in (("train", train), ("test", test))}
    return path, expected


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------
# names, splits, specs


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(InputError) as e:
        get_spec("mnist")
    msg = str(e.value)
    assert "'mnist'" in msg and "\n" not in msg
    for name in ("cifar10", "cifar100", "tiny-imagenet", "imagefolder", "digits"):
        assert name in msg
    with pytest.raises(InputError, match="unknown dataset"):
        load_dataset("mnist", tmp_path, "train")


def test_bad_split(tmp_path):
    with pytest.raises(InputError, match="unknown split 'val'; valid: train, test"):
        load_dataset("cifar10", tmp_path, "val")


def test_specs():
    assert set(DATASETS) == {"cifar10", "cifar100", "tiny-imagenet", "imagefolder", "digits"}
    c10 = get_spec("cifar10")
    assert (c10.num_classes, c10.image_size, c10.in_chans, c10.crop_padding, c10.flip) == (
        10, 32, 3, 4, True)
    assert len(c10.mean) == len(c10.std) == 3
    assert get_spec("cifar100").num_classes == 100
    assert get_spec("tiny-imagenet").image_size == 64
    d = get_spec("digits")
    assert (d.in_chans, d.crop_padding, d.flip) == (1, 1, False)
    assert get_spec("imagefolder").num_classes == 0


def test_array_dataset_subset_keeps_order():
    images = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    ds = ArrayDataset(images, torch.tensor([0, 1, 2, 0, 1]), ["a", "b", "c"])
    for idx in ([3, 0, 3], torch.tensor([3, 0, 3]), np.array([3, 0, 3])):
        sub = ds.subset(idx)
        assert len(sub) == 3 and sub.classes == ["a", "b", "c"]
        assert torch.equal(sub.images, images[[3, 0, 3]])
        assert sub.labels.tolist() == [0, 0, 0] and sub.labels.dtype == torch.int64
    with pytest.raises(ValueError):
        ArrayDataset(images.float(), torch.zeros(5, dtype=torch.long), ["a"])
    with pytest.raises(ValueError):
        ArrayDataset(images, torch.zeros(4, dtype=torch.long), ["a"])


# ---------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_from_official_format(tmp_path):
    _, src = make_cifar10(tmp_path)
    for split, n in (("train", 30), ("test", 7)):
        ds = load_dataset("cifar10", tmp_path, split, progress=False)
        data, labels = src[split]
        assert ds.images.shape == (n, 3, 32, 32) and ds.images.dtype == torch.uint8
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
        assert ds.classes == CIFAR10_CLASSES
        # CHW: channel c, row y, column x is at c * 1024 + y * 32 + x of the flat row
        i, c, y, x = n - 1, 2, 5, 17
        assert ds.images[i, c, y, x].item() == data[i, c * 1024 + y * 32 + x]
        assert ds.images[0, 0, 0, 1].item() == data[0, 1]
        assert ds.images[0, 1, 0, 0].item() == data[0, 1024]
        assert np.array_equal(ds.images.numpy().reshape(n, -1), data)


def test_cifar100_fine_labels(tmp_path):
    _, src = make_cifar100(tmp_path)
    ds = load_dataset("cifar100", tmp_path, "train", progress=False)
    data, fine = src["train"]
    assert ds.images.shape == (12, 3, 32, 32)
    assert ds.labels.tolist() == fine.tolist()
    assert len(ds.classes) == 100 and ds.classes[7] == "fine07"
    assert ds.images[3, 1, 31, 0].item() == data[3, 1024 + 31 * 32]
    test = load_dataset("cifar100", tmp_path, "test", progress=False)
    assert len(test) == 5 and test.labels.tolist() == src["test"][1].tolist()


def test_cache_is_hit_and_invalidated(tmp_path, monkeypatch):
    archive, _ = make_cifar10(tmp_path)
    first = load_dataset("cifar10", tmp_path, "train", progress=False)
    cache_dir = tmp_path / ".rpat-cache"
    cached = sorted(p.name for p in cache_dir.iterdir())
    assert len(cached) == 1 and cached[0].startswith("cifar10-train-") and cached[0].endswith(".npz")

    def boom(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(loadmod, "_decode_cifar", boom)
    second = load_dataset("cifar10", tmp_path, "train", progress=False)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert second.classes == first.classes
    # a changed archive (new mtime) is decoded again, and the stale cache is replaced
    st = archive.stat()
    os.utime(archive, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        load_dataset("cifar10", tmp_path, "train", progress=False)
    monkeypatch.undo()
    load_dataset("cifar10", tmp_path, "train", progress=False)
    names = sorted(p.name for p in cache_dir.iterdir())
    assert len(names) == 1 and names != cached  # no temp files, old cache gone
    # an explicit cache_dir
    load_dataset("cifar10", tmp_path, "test", cache_dir=tmp_path / "c", progress=False)
    assert [p.name.split("-")[:2] for p in (tmp_path / "c").iterdir()] == [["cifar10", "test"]]


def test_unreadable_cache_is_rebuilt(tmp_path):
    make_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, "test", progress=False)
    (cache,) = (tmp_path / ".rpat-cache").iterdir()
    cache.write_bytes(b"garbage")
    again = load_dataset("cifar10", tmp_path, "test", progress=False)
    assert torch.equal(ds.images, again.images)


def test_missing_archive_says_where_and_how(tmp_path):
    with pytest.raises(InputError) as e:
        load_dataset("cifar10", tmp_path, "train")
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-python.tar.gz") in msg and "--download" in msg


def test_corrupt_archives(tmp_path):
    path, _ = make_cifar10(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])  # truncated gzip
    with pytest.raises(InputError, match="cifar-10-python.tar.gz.*--download"):
        load_dataset("cifar10", tmp_path, "train", progress=False)
    path.write_bytes(b"this is not a tarball at all" * 10)
    with pytest.raises(InputError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path, "test", progress=False)
    (tmp_path / "tiny-imagenet-200.zip").write_bytes(b"PK\x03\x04 broken")
    with pytest.raises(InputError, match="tiny-imagenet-200.zip"):
        load_dataset("tiny-imagenet", tmp_path, "train", progress=False)


def test_cifar_pickles_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    members = {"cifar-10-batches-py/test_batch": pickle.dumps({b"data": Evil()}),
               "cifar-10-batches-py/batches.meta": _pickle({b"label_names": [b"a"]})}
    _write_tar_gz(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(InputError, match="cannot unpickle"):
        load_dataset("cifar10", tmp_path, "test", progress=False)


# ---------------------------------------------------------------------------------------
# downloads


class _Server:
    """A loopback HTTP server with fixed routes: path -> (status, body, content-length)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, int | None]] = {}
        self.hits: list[str] = []
        routes, hits = self.routes, self.hits

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append(self.path)
                status, body, length = routes.get(self.path, (404, b"not found", None))
                self.send_response(status)
                self.send_header("Content-Length", str(len(body) if length is None else length))
                self.end_headers()
                self.wfile.write(body)  # HTTP/1.0: the connection closes after this

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,),
                                       daemon=True)
        self.thread.start()
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture()
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def test_download_via_file_url_then_load(tmp_path):
    src_dir = tmp_path / "mirror"
    src_dir.mkdir()
    archive, src = make_cifar10(src_dir)
    root = tmp_path / "data"
    spec = dataclasses.replace(get_spec("cifar10"), url=archive.as_uri(), md5=_md5(archive))
    ds = load_dataset("cifar10", root, "test", download=True, spec=spec, progress=False)
    assert ds.labels.tolist() == src["test"][1].tolist()
    assert (root / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()
    assert not list(root.glob("*.part"))


def test_download_via_mirror_env(tmp_path, monkeypatch):
    src_dir = tmp_path / "mirror"
    src_dir.mkdir()
    archive, src = make_cifar100(src_dir)
    monkeypatch.setenv("RPAT_MIRROR", src_dir.as_uri() + "/")
    monkeypatch.setitem(DATASETS, "cifar100",
                        dataclasses.replace(DATASETS["cifar100"], md5=_md5(archive)))
    assert resolve_url(get_spec("cifar100").url) == src_dir.as_uri() + "/cifar-100-python.tar.gz"
    ds = load_dataset("cifar100", tmp_path / "data", "train", download=True, progress=False)
    assert ds.labels.tolist() == src["train"][1].tolist()


def test_download_http_good_and_sha256(tmp_path, server):
    archive, src = make_cifar10(tmp_path)
    body = archive.read_bytes()
    server.routes["/d/cifar-10-python.tar.gz"] = (200, body, None)
    spec = dataclasses.replace(get_spec("cifar10"), url=f"{server.base}/d/cifar-10-python.tar.gz",
                               md5=hashlib.md5(body).hexdigest())
    root = tmp_path / "root"
    ds = load_dataset("cifar10", root, "train", download=True, spec=spec, progress=False)
    assert len(ds) == 30 and ds.labels.tolist() == src["train"][1].tolist()
    dest = tmp_path / "x" / "copy.bin"
    out = download_file(f"{server.base}/d/cifar-10-python.tar.gz", dest,
                        sha256=hashlib.sha256(body).hexdigest(), progress=False)
    assert out == dest and dest.read_bytes() == body
    # an existing good file is not fetched again
    n = len(server.hits)
    download_file(f"{server.base}/d/cifar-10-python.tar.gz", dest, md5=_md5(dest), progress=False)
    assert len(server.hits) == n


def test_download_wrong_checksum_leaves_nothing(tmp_path, server):
    server.routes["/f.tar.gz"] = (200, b"some bytes", None)
    dest = tmp_path / "f.tar.gz"
    with pytest.raises(InputError) as e:
        download_file(f"{server.base}/f.tar.gz", dest, md5="0" * 32, progress=False)
    msg = str(e.value)
    assert f"{server.base}/f.tar.gz" in msg and "0" * 32 in msg
    assert hashlib.md5(b"some bytes").hexdigest() in msg
    assert list(tmp_path.iterdir()) == []
    # the same through file://
    src = tmp_path / "src.bin"
    src.write_bytes(b"abc")
    with pytest.raises(InputError, match="checksum mismatch"):
        download_file(src.as_uri(), dest, sha256="f" * 64, progress=False)
    assert list(tmp_path.iterdir()) == [src]


def test_download_truncated_leaves_nothing(tmp_path, server):
    body = b"x" * 5000
    server.routes["/t.zip"] = (200, body, len(body) + 1000)  # server closes early
    dest = tmp_path / "t.zip"
    with pytest.raises(InputError, match="truncated|interrupted") as e:
        download_file(f"{server.base}/t.zip", dest, md5=hashlib.md5(body).hexdigest(),
                      progress=False)
    assert f"{server.base}/t.zip" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_download_http_error(tmp_path, server):
    with pytest.raises(InputError, match="HTTP 404") as e:
        download_file(f"{server.base}/nope.tar.gz", tmp_path / "n.tar.gz", progress=False)
    assert "nope.tar.gz" in str(e.value) and not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="only http"):
        download_file("ftp://example.org/x", tmp_path / "x", progress=False)


def test_existing_corrupt_dest_is_named(tmp_path):
    src_dir = tmp_path / "mirror"
    src_dir.mkdir()
    archive, _ = make_cifar10(src_dir)
    root = tmp_path / "root"
    root.mkdir()
    dest = root / "cifar-10-python.tar.gz"
    dest.write_bytes(archive.read_bytes()[:100])  # a half-finished earlier download
    spec = dataclasses.replace(get_spec("cifar10"), url=archive.as_uri(), md5=_md5(archive))
    with pytest.raises(InputError) as e:
        load_dataset("cifar10", root, "train", download=True, spec=spec, progress=False)
    assert str(dest) in str(e.value) and "delete it" in str(e.value)
    assert dest.stat().st_size == 100  # left for the user to inspect


# ---------------------------------------------------------------------------------------
# Tiny-ImageNet


def test_tiny_imagenet_from_zip(tmp_path):
    _, expected = make_tiny(tmp_path)
    for split in ("train", "test"):
        ds = load_dataset("tiny-imagenet", tmp_path, split, progress=False)
        assert ds.classes == ["n001", "n002", "n003"]
        exp = expected[split]
        assert ds.images.shape == (len(exp), 3, 64, 64) and ds.images.dtype == torch.uint8
        assert ds.labels.tolist() == [ds.classes.index(w) for w, _ in exp]
        assert ds.labels.tolist() == sorted(ds.labels.tolist())  # grouped by class
        centre = ds.images[:, :, 32, 32].int()
        want = torch.tensor([c for _, c in exp], dtype=torch.int32)
        assert (centre - want).abs().max().item() <= 4  # JPEG of a solid color
    test = load_dataset("tiny-imagenet", tmp_path, "test", progress=False)
    assert Counter(test.labels.tolist()) == {0: 2, 1: 2, 2: 1}


# ---------------------------------------------------------------------------------------
# image folder (real CIFAR-10 JPEGs)


def test_imagefolder_on_real_cifar10_jpegs(cifar10_jpeg_subset, tmp_path, monkeypatch):
    root = cifar10_jpeg_subset
    cache = tmp_path / "cache"
    decode = loadmod._decode_imagefolder
    calls = []
    monkeypatch.setattr(loadmod, "_decode_imagefolder", lambda *a: calls.append(1) or decode(*a))
    train = load_dataset("imagefolder", root, "train", cache_dir=cache, progress=False)
    test = load_dataset("imagefolder", root, "test", cache_dir=cache, progress=False)
    assert calls == [1, 1]
    assert train.classes == CIFAR10_CLASSES and test.classes == CIFAR10_CLASSES
    assert train.images.shape == (400, 3, 32, 32) and test.images.shape == (200, 3, 32, 32)
    assert train.labels.tolist() == [k for k in range(10) for _ in range(40)]
    assert test.labels.tolist() == [k for k in range(10) for _ in range(20)]
    first = sorted((root / "train" / "bird").iterdir())[0]
    ref = np.asarray(Image.open(first).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(train.images[80].numpy(), ref)
    spec = spec_for("imagefolder", train)
    assert (spec.num_classes, spec.image_size, spec.in_chans) == (10, 32, 3)

    # the second load comes from the cache
    def boom(*a):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(loadmod, "_decode_imagefolder", boom)
    again = load_dataset("imagefolder", root, "train", cache_dir=cache, progress=False)
    assert torch.equal(again.images, train.images) and again.classes == train.classes


def _copy(src: Path, dst: Path, classes: tuple[str, ...] = ("cat", "dog")) -> Path:
    for split in ("train", "test"):
        for c in classes:
            shutil.copytree(src / split / c, dst / split / c)
    return dst


def test_imagefolder_corrupt_image_is_named(cifar10_jpeg_subset, tmp_path):
    root = _copy(cifar10_jpeg_subset, tmp_path / "f")
    load_dataset("imagefolder", root, "train", progress=False)  # fine, and cached
    bad = root / "train" / "dog" / "0007.jpg"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated JPEG
    with pytest.raises(InputError) as e:
        load_dataset("imagefolder", root, "train", progress=False)
    assert str(bad) in str(e.value) and "\n" not in str(e.value)
    bad.write_bytes(b"not an image")
    with pytest.raises(InputError, match="0007.jpg"):
        load_dataset("imagefolder", root, "train", progress=False)


def test_imagefolder_inconsistent_trees(cifar10_jpeg_subset, tmp_path):
    root = _copy(cifar10_jpeg_subset, tmp_path / "f")
    odd = root / "test" / "cat" / "0003.jpg"
    Image.new("RGB", (40, 32), (1, 2, 3)).save(odd)
    with pytest.raises(InputError, match="0003.jpg is 40x32"):
        load_dataset("imagefolder", root, "test", progress=False)
    odd.unlink()
    assert len(load_dataset("imagefolder", root, "test", progress=False)) == 39
    (root / "test" / "bird").mkdir()
    with pytest.raises(InputError, match="only in test: bird"):
        load_dataset("imagefolder", root, "test", progress=False)
    with pytest.raises(InputError, match="no train/ folder"):
        load_dataset("imagefolder", tmp_path / "nowhere", "train", progress=False)


def _tiny_folder(root: Path, splits: tuple[str, ...], classes: tuple[str, ...] = ("cat", "dog"),
                 per_class: int = 2) -> Path:
    """``root/<split>/<class>/<i>.png``: 4x4 solid images whose red value is ``10 * label + i``."""
    for split in splits:
        for label, cls in enumerate(classes):
            (root / split / cls).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (4, 4), (10 * label + i, 0, 0)).save(root / split / cls / f"{i}.png")
    return root


def test_imagefolder_test_split_needs_only_test(tmp_path):
    root = _tiny_folder(tmp_path / "f", ("test",), classes=("cat", "dog", "eel"))
    ds = load_dataset("imagefolder", root, "test", progress=False)
    assert ds.classes == ["cat", "dog", "eel"]  # from test/, there being no train/
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert ds.images[:, 0, 0, 0].tolist() == [0, 1, 10, 11, 20, 21]  # PNG is lossless: the red values
    assert loadmod.count_images("imagefolder", root, "test") == 6
    with pytest.raises(InputError, match="has no train/ folder"):  # training still needs train/
        load_dataset("imagefolder", root, "train", progress=False)
    # with train/ there, test/ must still hold the same classes
    _tiny_folder(root, ("train",), classes=("cat", "dog"))
    with pytest.raises(InputError, match="only in test: eel"):
        load_dataset("imagefolder", root, "test", progress=False)


def test_missing_cifar_archive_beside_an_image_folder_suggests_imagefolder(tmp_path):
    root = _tiny_folder(tmp_path / "f", ("train", "test"))
    with pytest.raises(InputError) as e:
        load_dataset("cifar10", root, "test", progress=False)
    assert str(e.value) == (f"cifar10 archive not found at {root / 'cifar-10-python.tar.gz'}, but {root} holds an "
                            "image folder (train/<class>/<image> or test/<class>/<image>): to use it pass "
                            "--dataset imagefolder")
    # only test/ is enough to look like one; an empty tree is not
    shutil.rmtree(root / "train")
    with pytest.raises(InputError, match="--dataset imagefolder"):
        load_dataset("cifar100", root, "test", progress=False)
    for f in (root / "test").rglob("*.png"):
        f.unlink()
    with pytest.raises(InputError) as e:
        load_dataset("cifar10", root, "test", progress=False)
    assert "imagefolder" not in str(e.value) and "--download" in str(e.value)


# ---------------------------------------------------------------------------------------
# digits


def test_digits_split():
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    train = load_dataset("digits", "ignored", "train")
    test = load_dataset("digits", "ignored", "test")
    assert train.images.shape[1:] == (1, 8, 8) and test.images.shape[1:] == (1, 8, 8)
    assert train.classes == [str(k) for k in range(10)] == test.classes
    assert len(train) + len(test) == 1797 and len(test) == 599
    assert train.images.max().item() == 255 and train.images.dtype == torch.uint8
    again = load_dataset("digits", "elsewhere", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    # the two splits partition the full set (as a multiset of (image, label))
    d = load_digits()
    full = np.rint(d.images * 255 / 16).astype(np.uint8)
    want = Counter((im.tobytes(), int(t)) for im, t in zip(full, d.target, strict=True))
    got = Counter((im.numpy().tobytes(), int(t))
                  for part in (train, test) for im, t in zip(part.images, part.labels, strict=True))
    assert got == want
    # stratified: a third of each class
    counts = np.bincount(d.target)
    assert np.bincount(test.labels.numpy()).tolist() == [round(c / 3) for c in counts]


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(InputError, match=r"pip install 'rpat\[digits\]'"):
        load_dataset("digits", ".", "train")


# ---------------------------------------------------------------------------------------
# augmentation and the device loader


def _reference_views(img: torch.Tensor, p: int, flip: bool) -> list[torch.Tensor]:
    """Every crop (offsets 0..2p) of the zero-padded image, and its mirror image if flip."""
    c, h, w = img.shape
    padded = torch.zeros(c, h + 2 * p, w + 2 * p, dtype=img.dtype)
    padded[:, p:p + h, p:p + w] = img
    views = []
    for oy in range(2 * p + 1):
        for ox in range(2 * p + 1):
            crop = padded[:, oy:oy + h, ox:ox + w]
            views.append(crop)
            views.append(crop.flip(-1) if flip else crop)
    return views


def _which_view(out: torch.Tensor, img: torch.Tensor, p: int, flip: bool) -> list[int]:
    return [k for k, v in enumerate(_reference_views(img, p, flip)) if torch.equal(out, v)]


@pytest.mark.parametrize("p, flip, shape", [(4, True, (3, 9, 7)), (2, False, (1, 8, 8)),
                                            (0, True, (2, 5, 6))])
def test_random_crop_flip_matches_reference(p, flip, shape):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(1, 256, (200, *shape), generator=g, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(123)
    out = random_crop_flip(images, p, flip, gen)
    assert out.shape == images.shape and out.dtype == torch.uint8
    seen = set()
    for i in range(len(images)):
        match = _which_view(out[i], images[i], p, flip)
        assert match, f"image {i} is not a padded crop{' / flip' if flip else ''} of its input"
        seen.update(match)
    if p == 2:  # every offset turns up
        assert {k // 2 for k in seen} == set(range(25))
    again = random_crop_flip(images, p, flip, torch.Generator().manual_seed(123))
    assert torch.equal(out, again)


def test_flip_frequency_is_half():
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (4000, 1, 2, 3), generator=g, dtype=torch.uint8)
    images[:, :, :, 0] = 0
    images[:, :, :, 2] = 255  # left and right columns differ in every image
    out = random_crop_flip(images, 0, True, torch.Generator().manual_seed(7))
    flipped = torch.all((out == images.flip(-1)).flatten(1), dim=1)
    same = torch.all((out == images).flatten(1), dim=1)
    assert torch.all(flipped ^ same)
    assert 0.45 < flipped.float().mean().item() < 0.55
    assert torch.equal(random_crop_flip(images, 0, False, torch.Generator()), images)


def _toy(n: int = 103) -> ArrayDataset:
    g = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (n, 3, 6, 6), generator=g, dtype=torch.uint8)
    return ArrayDataset(images, torch.arange(n), [str(i) for i in range(n)])  # label = index


def _epoch(loader: DeviceLoader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_device_loader_order_is_a_function_of_seed_and_epoch():
    ds = _toy()
    a = DeviceLoader(ds, 16, seed=3, augment=True)
    b = DeviceLoader(ds, 16, seed=3, augment=True, keep_on_device=False)
    e2 = _epoch(a, 2)
    _epoch(a, 0), _epoch(a, 5)  # history does not matter
    for (x1, y1), (x2, y2), (x3, y3) in zip(e2, _epoch(a, 2), _epoch(b, 2), strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert torch.equal(x1, x3) and torch.equal(y1, y3)
    y_e2 = torch.cat([y for _, y in e2])
    y_e3 = torch.cat([y for _, y in _epoch(a, 3)])
    assert not torch.equal(y_e2, y_e3)
    other_seed = torch.cat([y for _, y in _epoch(DeviceLoader(ds, 16, seed=4), 2)])
    assert not torch.equal(y_e2, other_seed)


def test_device_loader_covers_each_example_once():
    ds = _toy()
    loader = DeviceLoader(ds, 16, seed=0)
    assert len(loader) == 7
    batches = _epoch(loader, 1)
    assert [len(y) for _, y in batches] == [16] * 6 + [7]
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(103)) and ys.tolist() != list(range(103))
    for x, y in batches:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert torch.equal((x * 255).round().to(torch.uint8), ds.images[y])  # no augmentation
    dropped = DeviceLoader(ds, 16, drop_last=True)
    assert len(dropped) == 6
    ys = torch.cat([y for _, y in _epoch(dropped, 0)])
    assert len(ys) == 96 and len(set(ys.tolist())) == 96
    plain = DeviceLoader(ds, 50, shuffle=False)
    assert torch.cat([y for _, y in plain]).tolist() == list(range(103))


def test_device_loader_augments_on_the_fly():
    ds = _toy(40)
    loader = DeviceLoader(ds, 8, augment=True, padding=2, flip=True, seed=9)
    changed = 0
    for x, y in _epoch(loader, 0):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 6, 6)
        assert x.min().item() >= 0.0 and x.max().item() <= 1.0
        u8 = (x * 255).round().to(torch.uint8)
        for img, label in zip(u8, y, strict=True):
            assert _which_view(img, ds.images[label], 2, True)
            changed += not torch.equal(img, ds.images[label])
    assert changed > 20


def test_device_loader_rejects_bad_batch_size():
    with pytest.raises(InputError, match="batch size"):
        DeviceLoader(_toy(4), 0)


def test_evaluation_indices_first_n_for_cifar_and_class_mixed_for_image_folders():
    from rpat.data import evaluation_indices

    assert evaluation_indices("cifar10", 100, 10).tolist() == list(range(10))
    a = evaluation_indices("imagefolder", 1000, 100)
    b = evaluation_indices("imagefolder", 1000, 100)
    assert torch.equal(a, b) and len(set(a.tolist())) == 100
    # a class-sorted split of 10 classes x 100 images: the subset covers (nearly) every class
    assert len(set((a // 100).tolist())) >= 9
    assert evaluation_indices("imagefolder", 5, 10).numel() == 5

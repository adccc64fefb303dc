"""data.extra: the memory-mapped extra set (npz and shards), its checks, the sampler and the mixing loader."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from rpat.checkpoint import load_checkpoint
from rpat.cli import main
from rpat.config import build_config
from rpat.data import ArrayDataset, DeviceLoader
from rpat.data import extra as extra_mod
from rpat.data.extra import ExtraSource, check_extra, label_bounds, open_extra
from rpat.data.mixed import ExtraSampler, MixedLoader, feistel_permute, row_smoothing
from rpat.errors import InputError
from rpat.training import RunData, Trainer


def _arrays(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def _npz(path: Path, n: int = 40, **kw) -> tuple[Path, np.ndarray, np.ndarray]:
    images, labels = _arrays(n, **kw)
    np.savez(path, image=images, label=labels)
    return path, images, labels


# ---- reading ----------------------------------------------------------------------------------------------
def test_npz_members_are_memory_mapped_in_place(tmp_path):
    path, images, labels = _npz(tmp_path / "gen.npz")
    src = open_extra(path)
    (im, lab), = src.parts
    assert isinstance(im, np.memmap) and isinstance(lab, np.memmap) and src.layout == "npz, memory-mapped"
    assert len(src) == 40 and src.image_shape == (32, 32, 3)
    np.testing.assert_array_equal(im, images)  # the offset found from the zip headers is right
    np.testing.assert_array_equal(lab, labels)
    idx = np.array([5, 0, 39, 5])
    x, y = src.gather(idx)
    assert x.dtype == torch.uint8 and x.shape == (4, 32, 32, 3) and y.dtype == torch.int64
    np.testing.assert_array_equal(x.numpy(), images[idx])
    np.testing.assert_array_equal(y.numpy(), labels[idx])


def test_shard_directory_is_concatenated_in_name_order(tmp_path):
    images, labels = _arrays(30)
    d = tmp_path / "shards"
    d.mkdir()
    for name, sl in (("b", slice(10, 30)), ("a", slice(0, 10))):  # written out of order; read sorted by name
        np.save(d / f"{name}_image.npy", images[sl])
        np.save(d / f"{name}_label.npy", labels[sl].astype(np.int32))
    src = open_extra(d)
    assert len(src) == 30 and len(src.parts) == 2 and all(isinstance(p[0], np.memmap) for p in src.parts)
    idx = np.array([29, 0, 10, 9, 15, 9])
    x, y = src.gather(idx)
    np.testing.assert_array_equal(x.numpy(), images[idx])
    np.testing.assert_array_equal(y.numpy(), labels[idx])
    assert label_bounds(src) == (int(labels.min()), int(labels.max()))


def test_compressed_npz_read_whole_when_small_refused_when_large(tmp_path, monkeypatch):
    images, labels = _arrays(20)
    p = tmp_path / "c.npz"
    np.savez_compressed(p, image=images, label=labels)
    with pytest.warns(UserWarning, match="compressed .npz: read whole"):
        src = open_extra(p)
    np.testing.assert_array_equal(src.gather(np.arange(20))[0].numpy(), images)
    monkeypatch.setattr(extra_mod, "MAX_COMPRESSED_BYTES", 1000)
    with pytest.raises(InputError, match="cannot be memory-mapped; convert it once, streaming, to a directory"):
        open_extra(p)


# ---- bad input: one line each, at config time --------------------------------------------------------------
def _bad(tmp_path: Path, case: str) -> Path:
    p = tmp_path / f"{case}.npz"
    images, labels = _arrays(8)
    if case == "no_label":
        np.savez(p, image=images)
    elif case == "float_images":
        np.savez(p, image=images.astype(np.float32), label=labels)
    elif case == "nchw":
        np.savez(p, image=images.transpose(0, 3, 1, 2).copy(), label=labels)
    elif case == "labels_2d":
        np.savez(p, image=images, label=labels[:, None])
    elif case == "count":
        np.savez(p, image=images, label=labels[:5])
    elif case == "label_range":
        labels[3] = 10
        np.savez(p, image=images, label=labels)
    elif case == "negative_label":
        labels[3] = -1
        np.savez(p, image=images, label=labels)
    elif case == "size":
        np.savez(p, image=_arrays(8, size=16)[0], label=labels)
    elif case == "not_zip":
        p.write_text("hello")
    return p


@pytest.mark.parametrize("case, message", [
    ("no_label", "has no 'label' array"),
    ("float_images", "images are float32, expected uint8"),
    ("nchw", "it looks like N x C x H x W: transpose to N x H x W x C"),
    ("labels_2d", "expected N integers"),
    ("count", "8 images but 5 labels"),
    ("label_range", "labels range over [0, 10], outside [0, 10)"),
    ("negative_label", "labels range over [-1,"),
    ("size", "images are 16x16 but the training images are 32x32"),
    ("not_zip", "is not an .npz file"),
])
def test_bad_extra_file_is_one_line_at_config_time(tmp_path, case, message):
    p = _bad(tmp_path, case)
    with pytest.raises(InputError) as e:
        build_config(overrides=[f"data.extra={p}"])
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("data.extra_fraction=1.0", "data.extra_fraction must be a number in [0, 1), got 1.0"),
    ("data.extra_fraction=-0.1", "data.extra_fraction must be a number in [0, 1)"),
    ("data.extra_label_smoothing=1.5", "data.extra_label_smoothing must be a number in [0, 1)"),
    ("data.extra_fraction=0", "is 0 extra rows per batch"),
])
def test_bad_fraction_and_smoothing(tmp_path, override, message):
    p, _, _ = _npz(tmp_path / "ok.npz", n=8)
    with pytest.raises(InputError, match=None) as e:
        build_config(overrides=[f"data.extra={p}", override])
    assert message in str(e.value)


def test_missing_path_exits_2_before_training(tmp_path, capsys):
    code = main(["train", "--run-dir", str(tmp_path / "run"), f"data.extra={tmp_path / 'nope.npz'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not exist" in err[0] and err[0].startswith("rpat: error: ")
    assert not (tmp_path / "run").exists()


def test_image_folder_checks_wait_for_the_real_images(tmp_path):
    """imagefolder's spec knows neither size nor classes: config time checks only the file; the rest is
    checked against the real set (here: 3 classes, labels up to 9)."""
    p, _, _ = _npz(tmp_path / "ok.npz", n=8)
    build_config(overrides=["data.dataset=imagefolder", f"data.extra={p}"])  # accepted at config time
    with pytest.raises(InputError, match=r"outside \[0, 3\)"):
        check_extra(open_extra(p), num_classes=3, image_size=(32, 32), in_chans=3)


# ---- the sampler ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 1000, 1025])
def test_feistel_permutation_is_a_bijection(n):
    for key in (0, 12345):
        out = feistel_permute(np.arange(n), n, key)
        assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert not np.array_equal(feistel_permute(np.arange(n), n, 1), feistel_permute(np.arange(n), n, 2))


def test_sampler_walks_each_row_once_per_pass_and_is_a_function_of_seed_epoch_step():
    n, rows, spe = 1000, 10, 7
    s = ExtraSampler(n, rows, spe, seed=5)
    draws = [s.indices(g // spe, g % spe) for g in range(200)]  # 2000 positions = two full passes
    first, second = np.concatenate(draws[:100]), np.concatenate(draws[100:])
    assert sorted(first.tolist()) == list(range(n)) and sorted(second.tolist()) == list(range(n))
    assert not np.array_equal(first, second)  # each pass is reshuffled
    again = ExtraSampler(n, rows, spe, seed=5)  # a fresh object (a resumed run): the same rows
    np.testing.assert_array_equal(again.indices(13, 4), draws[13 * spe + 4])
    assert not np.array_equal(ExtraSampler(n, rows, spe, seed=6).indices(13, 4), draws[13 * spe + 4])


def test_two_ranks_draw_disjoint_shares():
    n, rows, spe = 5000, 16, 9
    s = ExtraSampler(n, rows, spe, seed=0, world_size=2)
    seen = []
    for epoch in range(2):
        for step in range(spe):
            r0, r1 = s.indices(epoch, step, rank=0), s.indices(epoch, step, rank=1)
            assert len(r0) == len(r1) == rows and not set(r0.tolist()) & set(r1.tolist())
            seen += [r0, r1]
    allrows = np.concatenate(seen)
    assert len(np.unique(allrows)) == len(allrows) == 2 * spe * 2 * rows  # no row twice in the pass
    # the two ranks' rows are the positions r::2 of the one-process draw of 2·rows rows
    single = ExtraSampler(n, 2 * rows, spe, seed=0).indices(1, 3)
    np.testing.assert_array_equal(single[0::2], s.indices(1, 3, 0))
    np.testing.assert_array_equal(single[1::2], s.indices(1, 3, 1))


# ---- the mixing loader --------------------------------------------------------------------------------------
def _real(n: int = 50) -> ArrayDataset:
    """Image i is all pixels i (i < 50 < 100), label i % 10."""
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 32, 32).contiguous()
    return ArrayDataset(images, torch.arange(n) % 10, [str(i) for i in range(10)])


def _extra(n: int = 300) -> ExtraSource:
    """Extra image j is all pixels 100 + j % 150 (>= 100), label j % 10."""
    images = (100 + np.arange(n) % 150).astype(np.uint8)[:, None, None, None] * np.ones((1, 32, 32, 3), np.uint8)
    return ExtraSource("mem", [(images, np.arange(n) % 10)], "in memory")


def test_batch_composition_counts_and_real_part_as_a_normal_epoch():
    real = _real()
    loader = MixedLoader(DeviceLoader(real, 16, seed=1), _extra(), fraction=0.25)
    assert (loader.batch_size, loader.extra_rows, loader.real_rows) == (16, 4, 12)
    assert len(loader) == 4  # ceil(50 / 16): as many batches as the real set needs at batch 16
    loader.set_epoch(2)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [16, 16, 16, 16]
    plain = DeviceLoader(real, 12, seed=1)
    plain.set_epoch(2)
    real_rows = []
    for (x, y), (xp, yp) in zip(batches, list(plain)[:4], strict=True):
        v = (x[:, 0, 0, 0] * 255).round().long()
        assert (v[:12] < 100).all() and (v[12:] >= 100).all()  # 12 real rows first, then the 4 extra rows
        torch.testing.assert_close(x[:12], xp, rtol=0, atol=0)  # the real part is the normal epoch's, in order
        assert torch.equal(y[:12], yp)
        assert torch.equal(y[12:], (v[12:] - 100) % 10)  # extra labels travel with their images
        real_rows.append(v[:12])
    real_rows = torch.cat(real_rows)
    assert len(real_rows.unique()) == 48  # the first 48 of epoch 2's permutation: no real image twice
    assert torch.equal(real_rows, plain.indices()[:48])
    # a fraction that leaves more real rows than the epoch needs: the last batch is short
    short = MixedLoader(DeviceLoader(real, 16, seed=1), _extra(), fraction=0.0625)  # 1 extra row, 15 real
    assert len(short) == 4 and [len(y) for _, y in short] == [16, 16, 16, 6]  # 45 + 5 real rows = 50


def test_both_parts_are_augmented_on_one_path():
    loader = MixedLoader(DeviceLoader(_real(), 16, seed=0, augment=True, padding=4), _extra(), fraction=0.5)
    x, _ = next(iter(loader))
    zeros = (x == 0).flatten(1).any(1)  # a shifted crop brings in zero padding
    assert zeros[8:].sum() >= 4 and zeros[1:8].sum() >= 3  # extra rows (8..15) cropped like the real ones


def test_mixed_batches_are_the_same_after_a_resume():
    def epoch(loader, e):
        loader.set_epoch(e)
        return [(x.clone(), y.clone()) for x, y in loader]

    a = MixedLoader(DeviceLoader(_real(), 16, seed=3, augment=True, padding=4), _extra(), fraction=0.3)
    seen = [epoch(a, e) for e in range(3)]
    b = MixedLoader(DeviceLoader(_real(), 16, seed=3, augment=True, padding=4), _extra(), fraction=0.3)
    for (xa, ya), (xb, yb) in zip(seen[2], epoch(b, 2), strict=True):  # straight to epoch 2, as a resume does
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert not torch.equal(seen[1][0][0], seen[2][0][0])


def test_views_repeat_the_mixed_batch_and_row_smoothing_marks_the_extra_rows():
    loader = MixedLoader(DeviceLoader(_real(), 10, seed=0, views=2), _extra(), fraction=0.3)
    x, y = next(iter(loader))
    assert x.shape[0] == 20 and torch.equal(y[:10], y[10:])
    v = (x[:, 0, 0, 0] * 255).round()
    s = row_smoothing(20, 2, 3, 0.1)
    assert torch.equal(s > 0, v >= 100) and torch.allclose(s[s > 0], torch.tensor(0.1))


def test_mixed_loader_refuses_other_image_size():
    src = ExtraSource("mem", [(np.zeros((4, 16, 16, 3), np.uint8), np.zeros(4, np.int64))], "in memory")
    with pytest.raises(InputError, match="16x16x3"):
        MixedLoader(DeviceLoader(_real(), 16), src, 0.5)


# ---- memory: a 1M-image map stays out of RSS ---------------------------------------------------------------
def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def write_sparse_npz(path: Path, n: int, marks: dict[int, int]) -> np.ndarray:
    """An uncompressed .npz of ``n`` 32x32x3 uint8 images written as a sparse file (the image data is a hole,
    except rows ``marks`` filled with their value) plus real int64 labels; returns the labels. The image
    member's CRC is left 0 (no reader here checks it). Needs no zip64 while the file is below 4 GiB."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (n, 32, 32, 3)})
    img_head, img_size = header.getvalue(), len(header.getvalue()) + n * 3072
    labels = (np.arange(n) % 10).astype(np.int64)
    buf = io.BytesIO()
    np.save(buf, labels)
    lab = buf.getvalue()
    entries, pos = [], 0
    with open(path, "wb") as f:
        for name, size, crc in ((b"image.npy", img_size, 0), (b"label.npy", len(lab), zlib.crc32(lab))):
            entries.append((name, size, crc, pos))
            f.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, crc, size, size, len(name), 0) + name)
            data_at = f.tell()
            if name == b"image.npy":
                f.write(img_head)
                for row, value in marks.items():
                    f.seek(data_at + len(img_head) + row * 3072)
                    f.write(bytes([value]) * 3072)
                f.seek(data_at + size)
            else:
                f.write(lab)
            pos = f.tell()
        cd_at = pos
        for name, size, crc, off in entries:
            f.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, crc, size, size, len(name),
                                0, 0, 0, 0, 0, off) + name)
        cd_size = f.tell() - cd_at
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 2, 2, cd_size, cd_at, 0))
    return labels


def test_a_million_image_npz_is_mapped_without_entering_rss(tmp_path):
    n = 1_000_000  # 3.07 GB of images, as a sparse file: no disk space, no write time
    marks = {0: 1, 123_456: 7, n - 1: 255}
    write_sparse_npz(tmp_path / "1m.npz", n, marks)
    assert zipfile.ZipFile(tmp_path / "1m.npz").namelist() == ["image.npy", "label.npy"]
    warm, _, _ = _npz(tmp_path / "warm.npz", n=400)  # the same code path once first (library pages, caches)
    ws = open_extra(build_config(overrides=[f"data.extra={warm}"]).data.extra)
    ws.gather(ExtraSampler(len(ws), 358, 98, seed=0).indices(0, 0))
    before = _rss_bytes()
    cfg = build_config(overrides=[f"data.extra={tmp_path / '1m.npz'}", "data.batch_size=512"])  # opens + checks
    src = open_extra(cfg.data.extra)
    x, y = src.gather(np.array(list(marks)))
    assert x.flatten(1).float().mean(1).tolist() == [1.0, 7.0, 255.0] and y.tolist() == [0, 6, 9]
    sampler = ExtraSampler(len(src), 358, 98, seed=0)
    for step in range(5):
        src.gather(sampler.indices(0, step))
    grown = _rss_bytes() - before
    # the pages read (labels scanned, batch rows) are released after use: a few MiB, not 3 GB
    assert grown < 16 << 20, f"RSS grew by {grown / 2**20:.0f} MiB"  # measured here: 4.1 MiB


# ---- the trainer with data.extra -----------------------------------------------------------------------------
def _digits_like(tmp_path: Path) -> tuple[RunData, Path]:
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (144,), generator=g)
    images = (torch.rand(144, 1, 8, 8, generator=g) * 120 + labels.view(-1, 1, 1, 1) * 40).clamp(0, 255)
    images = images.to(torch.uint8)
    classes = ["a", "b", "c", "d"]
    data = RunData(ArrayDataset(images[:96], labels[:96], classes), ArrayDataset(images[96:], labels[96:], classes),
                   4, 1, 1, False, None, None)
    rng = np.random.default_rng(1)
    ex_labels = rng.integers(0, 4, 64)
    ex_images = (rng.random((64, 8, 8, 1)) * 120 + ex_labels[:, None, None, None] * 40).clip(0, 255)
    np.savez(tmp_path / "extra.npz", image=ex_images.astype(np.uint8), label=ex_labels)
    return data, tmp_path / "extra.npz"


def _extra_cfg(path: Path, epochs: int = 2):
    return build_config(None, None, [
        {"data": {"dataset": "digits", "batch_size": 32, "extra": str(path), "extra_fraction": 0.5},
         "model": {"arch": "small_cnn"}, "attack": {"eps": "16/255", "step_size": "8/255", "steps": 2},
         "optim": {"epochs": epochs, "lr": 0.05, "milestones": [1]}, "eval": {"n_examples": 48, "steps": 3},
         "device": "cpu"}])


def test_trainer_mixes_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    data, path = _digits_like(tmp_path)
    cfg = _extra_cfg(path)
    logs: list[str] = []
    a = Trainer(cfg, tmp_path / "a", data=data, progress=False, log=logs.append)
    assert isinstance(a.loader, MixedLoader) and len(a.loader) == 3  # ceil(96 real / batch 32)
    assert any("16 of 32 rows per batch (50.0%)" in m and "an epoch is 3 batches" in m for m in logs)
    a.fit()
    b = Trainer(cfg, tmp_path / "b", data=data, progress=False, log=lambda m: None)
    calls = {"n": 0}
    real_step = b.objective.step

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # second step of the second epoch
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(b.objective, "step", flaky)
    with pytest.raises(KeyboardInterrupt):
        b.fit()
    monkeypatch.undo()
    Trainer(cfg, tmp_path / "b", resume=True, data=data, progress=False, log=lambda m: None).fit()
    wa, wb = (load_checkpoint(tmp_path / d / "final.pt")["model"] for d in ("a", "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    plain = build_config(None, None, [{**cfg.to_dict(), "data": {**cfg.to_dict()["data"], "extra": None}}])
    Trainer(plain, tmp_path / "c", data=data, progress=False, log=lambda m: None).fit()
    wc = load_checkpoint(tmp_path / "c" / "final.pt")["model"]
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)  # the extra rows changed the training


def test_extra_label_smoothing_reaches_the_loss_on_the_extra_rows_only(tmp_path, monkeypatch):
    data, path = _digits_like(tmp_path)
    cfg = _extra_cfg(path, epochs=1)
    cfg.data.extra_label_smoothing = 0.2
    t = Trainer(cfg.validate(), tmp_path / "a", data=data, progress=False, log=lambda m: None)
    seen = []
    real_step = t.objective.step

    def spy(*args, **kwargs):
        seen.append(kwargs["smoothing"])
        return real_step(*args, **kwargs)

    monkeypatch.setattr(t.objective, "step", spy)
    t.train_epoch(0)
    assert len(seen) == 3 and all(s is seen[0] for s in seen)  # one cached tensor for the full batches
    assert seen[0].tolist() == [0.0] * 16 + [pytest.approx(0.2)] * 16
    # the PGD-AT loss with that tensor, by hand: row i's target is (1 - s_i)·onehot(y_i) + s_i/K
    x, y = next(iter(t.loader))
    loss, _ = t.objective.loss(t.model, x, y, x, 0, smoothing=seen[0])
    logp = torch.log_softmax(t.model(x), 1)
    s = seen[0]
    hand = (-(1 - s) * logp.gather(1, y[:, None])[:, 0] - s * logp.mean(1)).mean()
    torch.testing.assert_close(loss, hand)
    t0 = Trainer(_extra_cfg(path, epochs=1), tmp_path / "b", data=data, progress=False, log=lambda m: None)
    assert t0.train_step.row_smoothing is None  # extra_label_smoothing=0: the method's own smoothing, as before


def test_cuda_graph_stand_in_equals_the_eager_step_with_extra_rows_and_smoothing(tmp_path):
    """speed.cuda_graph=eager (the capture bookkeeping without a GPU) gives the eager trainer's weights with
    mixed batches and the per-row smoothing tensor (a constant input of the captured step)."""
    data, path = _digits_like(tmp_path)
    out = {}
    for mode in (False, "eager"):
        cfg = _extra_cfg(path, epochs=1)
        cfg.data.extra_label_smoothing = 0.1
        cfg.speed.cuda_graph = mode
        Trainer(cfg.validate(), tmp_path / str(mode), data=data, progress=False, log=lambda m: None).fit()
        out[mode] = load_checkpoint(tmp_path / str(mode) / "final.pt")["model"]
    assert all(torch.equal(out[False][k], out["eager"][k]) for k in out[False])


def test_npz_to_shards_streams_a_compressed_file_into_mappable_shards(tmp_path):
    images, labels = _arrays(25)
    np.savez_compressed(tmp_path / "c.npz", image=images, label=labels)
    assert extra_mod.npz_to_shards(tmp_path / "c.npz", tmp_path / "shards", rows_per_shard=10) == 25
    assert sorted(f.name for f in (tmp_path / "shards").iterdir())[:2] == ["part00000_image.npy",
                                                                          "part00000_label.npy"]
    src = open_extra(tmp_path / "shards")
    assert [len(lab) for _, lab in src.parts] == [10, 10, 5] and src.layout.endswith("memory-mapped")
    x, y = src.gather(np.arange(25))
    np.testing.assert_array_equal(x.numpy(), images)
    np.testing.assert_array_equal(y.numpy(), labels)


def test_two_rank_mixed_loaders_share_nothing_within_a_step():
    """Rank 0 and 1 of 2 (as under torchrun): per step, disjoint real rows and disjoint extra rows."""
    loaders = [MixedLoader(DeviceLoader(_real(48), 8, seed=2, rank=r, world_size=2), _extra(150), 0.5)
               for r in (0, 1)]  # extra image j is all pixels 100 + j: its value names it
    assert [len(lo) for lo in loaders] == [3, 3]  # ceil(24 real images per rank / 8)
    for lo in loaders:
        lo.set_epoch(1)
    for (x0, _), (x1, _) in zip(*loaders, strict=True):
        v0, v1 = ((x[:, 0, 0, 0] * 255).round().long().tolist() for x in (x0, x1))
        assert not set(v0[:4]) & set(v1[:4])  # real images: the epoch's permutation split r::2
        assert not set(v0[4:]) & set(v1[4:]) and min(v0[4:] + v1[4:]) >= 100  # extra images: disjoint shares

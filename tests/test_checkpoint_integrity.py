"""Every number honest: damaged checkpoints are refused, unverified weights are named, and a plain
state_dict's architecture is inferred from its keys and shapes."""

from __future__ import annotations

import hashlib
import pathlib
import struct
import zipfile
from pathlib import Path

import pytest
import torch

import rpat.checkpoint as ck
from rpat.checkpoint import (
    FORMAT,
    FORMAT_VERSION,
    MODEL_DIGEST_KEY,
    STATE_DIGEST_KEY,
    atomic_save,
    load_checkpoint,
    model_from_checkpoint,
    state_dict_sha256,
)
from rpat.cli import main
from rpat.errors import InputError
from rpat.models import create_model


def _model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", num_classes=10, in_chans=1)


def _rpat_checkpoint(model: torch.nn.Module, with_optimizer: bool = False) -> dict:
    """A dict shaped like the trainer's checkpoints (rpat.training.trainer.Trainer._weights)."""
    obj = {"format": FORMAT, "format_version": FORMAT_VERSION, "rpat_version": "test", "arch": "small_cnn",
           "model_kwargs": {"num_classes": 10, "in_chans": 1, "mean": None, "std": None},
           "model": model.state_dict(), "epoch": 3}
    if with_optimizer:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        model(torch.rand(4, 1, 8, 8)).sum().backward()
        opt.step()
        obj["optimizer"] = opt.state_dict()
        obj["rng"] = torch.get_rng_state()
    return obj


def _entry_offset(path: Path, data: bytes) -> int:
    """Offset in the file of the zip entry (a ``data/N`` tensor record) whose contents are ``data``."""
    raw = path.read_bytes()
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            if "/data/" in info.filename and zf.read(info) == data:
                assert info.compress_type == zipfile.ZIP_STORED  # torch stores tensor records raw
                name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
                return info.header_offset + 30 + name_len + extra_len
    raise AssertionError("no zip entry holds that tensor's bytes")


def _flip(path: Path, offset: int, n: int = 4) -> None:
    raw = bytearray(path.read_bytes())
    for i in range(offset, offset + n):
        raw[i] ^= 0xFF
    path.write_bytes(bytes(raw))


def _damage_tensor(path: Path, t: torch.Tensor) -> None:
    """Flip 4 bytes in the middle of ``t``'s raw data inside the saved zip."""
    data = t.contiguous().numpy().tobytes()
    _flip(path, _entry_offset(path, data) + len(data) // 2)


# ---- the digest ---------------------------------------------------------------------------------
def test_digest_covers_names_dtypes_shapes_and_bytes_not_memory_layout():
    w = torch.arange(24, dtype=torch.float32).reshape(2, 3, 2, 2)
    # by hand: names, dtypes, shapes and raw bytes in key order
    h = hashlib.sha256(b"rpat-tensors-v1\n")
    h.update(b"w\0torch.float32\0(2, 3, 2, 2)\0" + b"96\n")
    h.update(w.numpy().tobytes())
    assert state_dict_sha256({"w": w}) == h.hexdigest()
    base = state_dict_sha256({"w": w, "b": torch.zeros(2)})
    assert state_dict_sha256({"w": w.to(memory_format=torch.channels_last), "b": torch.zeros(2)}) == base
    changed = w.clone()
    changed.view(-1)[7] += 1
    assert state_dict_sha256({"w": changed, "b": torch.zeros(2)}) != base  # one value
    assert state_dict_sha256({"b": torch.zeros(2), "w": w}) != base  # key order
    assert state_dict_sha256({"v": w, "b": torch.zeros(2)}) != base  # a name
    assert state_dict_sha256({"w": w.reshape(2, 12), "b": torch.zeros(2)}) != base  # a shape
    assert state_dict_sha256({"w": w, "b": torch.zeros(2, dtype=torch.int32)}) != base  # a dtype, same bytes


def test_atomic_save_stores_the_digests_without_changing_the_callers_dict(tmp_path):
    model = _model()
    obj = _rpat_checkpoint(model, with_optimizer=True)
    atomic_save(obj, tmp_path / "a.pt")
    assert MODEL_DIGEST_KEY not in obj and STATE_DIGEST_KEY not in obj
    raw = torch.load(tmp_path / "a.pt", weights_only=True)
    assert raw[MODEL_DIGEST_KEY] == state_dict_sha256(model.state_dict())
    assert len(raw[STATE_DIGEST_KEY]) == 64
    assert load_checkpoint(tmp_path / "a.pt")["epoch"] == 3
    # anything that is not an rpat checkpoint is saved as given
    atomic_save({"w": torch.ones(2)}, tmp_path / "plain.pt")
    assert set(torch.load(tmp_path / "plain.pt", weights_only=True)) == {"w"}


# ---- damaged tensor data ------------------------------------------------------------------------
def test_flipped_bytes_inside_a_model_tensor_are_refused(tmp_path):
    model = _model()
    path = tmp_path / "best.pt"
    atomic_save(_rpat_checkpoint(model), path)
    _damage_tensor(path, model.state_dict()["fc2.weight"])
    for load in (load_checkpoint, model_from_checkpoint):
        with pytest.raises(InputError) as e:
            load(path)
        msg = str(e.value)
        assert msg == (f"checkpoint {str(path)!r} is damaged: its model tensor data does not match the SHA-256 "
                       "digest rpat stored when writing it; restore the file from a copy or use another checkpoint")
    # the premise: torch itself loads the damaged bytes without a word
    raw = torch.load(path, weights_only=True)
    assert not torch.equal(raw["model"]["fc2.weight"], model.state_dict()["fc2.weight"])


def test_rpat_eval_of_a_damaged_checkpoint_exits_2(tmp_path, capsys):
    model = _model()
    path = tmp_path / "best.pt"
    atomic_save(_rpat_checkpoint(model), path)
    _damage_tensor(path, model.state_dict()["features.0.0.weight"])
    assert main(["eval", str(path), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rpat: error: checkpoint ") and "is damaged" in err and str(path) in err


def test_flipped_bytes_in_the_training_state_are_refused(tmp_path):
    """Resume reads last.pt through load_checkpoint: the optimizer's momentum is covered too."""
    model = _model()
    obj = _rpat_checkpoint(model, with_optimizer=True)
    path = tmp_path / "last.pt"
    atomic_save(obj, path)
    momentum = obj["optimizer"]["state"][len(obj["optimizer"]["state"]) - 1]["momentum_buffer"]
    _damage_tensor(path, momentum)
    with pytest.raises(InputError, match=r"is damaged: its training-state \(optimizer, averaged weights, RNG\) "
                                         r"tensor data does not match"):
        load_checkpoint(path)


# ---- damaged or foreign files ----------------------------------------------------------------------
@pytest.mark.parametrize("damage, detail", [
    ("truncate", "(PytorchStreamReader failed reading zip archive: failed finding central directory)"),
    ("header", "(Unsupported operand "),
    ("empty", "(the file is empty)"),
    ("text", "(KeyError: "),
])
def test_unreadable_files_get_rpats_message_never_weights_only(tmp_path, damage, detail):
    path = tmp_path / "best.pt"
    atomic_save(_rpat_checkpoint(_model()), path)
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "header":
        path.write_bytes(b"garbage!" + raw[8:])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        path.write_text("hello, not a checkpoint")
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert msg.startswith(f"cannot load checkpoint {str(path)!r}: the file is damaged or not a PyTorch checkpoint ")
    assert detail in msg
    assert "weights_only" not in msg and "\n" not in msg


def test_a_pickled_module_is_not_called_damaged(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(InputError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "holds a Python object (torch.nn.modules.linear.Linear)" in msg and "torch.save(model.state_dict()" in msg
    assert "damaged" not in msg and "weights_only" not in msg


# ---- unverified weights ---------------------------------------------------------------------------
def test_a_plain_state_dict_is_unverified_once_per_file(tmp_path):
    path = tmp_path / "plain.pt"
    model = _model()
    torch.save(model.state_dict(), path)
    lines: list[str] = []
    for _ in range(2):
        loaded, _ = model_from_checkpoint(path, in_chans=1, log=lines.append)
        assert torch.equal(loaded.fc2.weight, model.fc2.weight)
    unverified = [line for line in lines if "unverified" in line]
    assert unverified == [f"{path}: unverified weights: a plain state_dict (no rpat digest); damage inside its "
                          "tensor data would go unnoticed"]
    assert lines.count(f"{path}: architecture inferred from the weights: small_cnn") == 2  # each load says which
    # without a log: a UserWarning, once
    other = tmp_path / "other.pt"
    torch.save(model.state_dict(), other)
    with pytest.warns(UserWarning, match="unverified weights") as rec:
        model_from_checkpoint(other, arch="small_cnn", in_chans=1)
        model_from_checkpoint(other, arch="small_cnn", in_chans=1)
    assert sum("unverified" in str(w.message) for w in rec) == 1


def test_a_checkpoint_written_before_the_digests_loads_and_is_unverified(tmp_path):
    model = _model()
    path = tmp_path / "old.pt"
    torch.save(_rpat_checkpoint(model), path)  # what atomic_save wrote before this change: no digest
    assert MODEL_DIGEST_KEY not in torch.load(path, weights_only=True)
    assert load_checkpoint(path)["epoch"] == 3
    lines: list[str] = []
    loaded, _ = model_from_checkpoint(path, log=lines.append)
    assert torch.equal(loaded.fc2.weight, model.fc2.weight)
    assert lines == [f"{path}: unverified weights: an rpat checkpoint written before rpat stored tensor digests; "
                     "damage inside its tensor data would go unnoticed"]


def test_a_verified_checkpoint_loads_silently(tmp_path):
    path = tmp_path / "best.pt"
    atomic_save(_rpat_checkpoint(_model()), path)
    lines: list[str] = []
    model_from_checkpoint(path, log=lines.append)
    assert lines == []


# ---- the architecture of a plain state_dict -------------------------------------------------------
@pytest.mark.parametrize("arch, in_chans", [("resnet18", 3), ("small_cnn", 1)])
def test_model_from_checkpoint_infers_the_architecture(tmp_path, arch, in_chans):
    torch.manual_seed(0)
    src = create_model(arch, num_classes=10, in_chans=in_chans)
    path = tmp_path / f"{arch}.pt"
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, path)  # DDP-wrapped keys
    lines: list[str] = []
    model, _ = model_from_checkpoint(path, in_chans=in_chans, log=lines.append)
    assert model.arch == arch and lines[0] == f"{path}: architecture inferred from the weights: {arch}"
    x = torch.rand(2, in_chans, 32 if arch == "resnet18" else 8, 32 if arch == "resnet18" else 8)
    with torch.no_grad():
        assert torch.equal(model(x), src.eval()(x))


def test_an_unrelated_state_dict_is_refused_with_the_arch_message(tmp_path):
    path = tmp_path / "mystery.pt"
    torch.save({"encoder.weight": torch.zeros(4, 4), "decoder.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(InputError) as e:
        model_from_checkpoint(path)
    assert str(e.value) == (f"{str(path)!r} is a plain state_dict and its keys and shapes fit none of rpat's models "
                            "with 3 input channel(s): name its architecture with --arch (see `rpat list models`)")
    # small_cnn weights for 1 channel do not fit a 3-channel model
    torch.save(_model().state_dict(), path)
    with pytest.raises(InputError, match="fit none of rpat's models with 10 classes and 3 input channel"):
        model_from_checkpoint(path, num_classes=10)


def test_several_fitting_architectures_are_listed(tmp_path, monkeypatch):
    path = tmp_path / "twin.pt"
    torch.save(_model().state_dict(), path)
    monkeypatch.setattr(ck, "infer_arch", lambda *a, **k: ["small_cnn", "tiny_cnn"])
    with pytest.raises(InputError, match=r"its weights fit several models \(small_cnn, tiny_cnn\): name its "
                                         r"architecture with --arch"):
        model_from_checkpoint(path, in_chans=1)


def test_pyautoattack_example_checkpoint_is_a_resnet18(monkeypatch):
    monkeypatch.setattr(ck, "_UNVERIFIED_NOTED", set())  # other tests may have loaded the file already
    pyautoattack = pytest.importorskip("pyautoattack")
    path = pathlib.Path(pyautoattack.__file__).parent / "examples/model_test.pt"
    if not path.is_file():
        pytest.skip(f"{path} is not in this pyautoattack wheel")
    lines: list[str] = []
    model, _ = model_from_checkpoint(path, log=lines.append)  # legacy format, CUDA storages: mapped to the CPU
    assert model.arch == "resnet18" and f"{path}: architecture inferred from the weights: resnet18" in lines
    assert any("unverified weights: a plain state_dict" in line for line in lines)

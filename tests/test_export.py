"""``rpat export`` to safetensors and ``rpat eval model.safetensors``: bit-equal weights, equal predictions, the
header's model card, equal evaluation results, the DDP prefix stripped, and bad input as one line (exit 2)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("sklearn")  # the 8x8 digits

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from rpat.checkpoint import atomic_save, load_checkpoint, model_from_checkpoint  # noqa: E402
from rpat.cli import main  # noqa: E402
from rpat.config import build_config  # noqa: E402
from rpat.errors import InputError  # noqa: E402
from rpat.evaluation.export import export_safetensors  # noqa: E402
from rpat.models import create_model  # noqa: E402
from rpat.training import Trainer  # noqa: E402

EVAL = ["--n-examples", "16", "--autoattack", "none", "--no-sanity", "--no-progress", "--steps", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-epoch small_cnn run on 64 digits, weight averaging on, normalization inside the model."""
    cfg = build_config(None, None, [
        {"data": {"dataset": "digits", "batch_size": 32, "train_subset": 64},
         "model": {"arch": "small_cnn", "normalize": True},
         "attack": {"eps": "32/255", "step_size": "8/255", "steps": 1},
         "optim": {"epochs": 2, "lr": 0.05, "milestones": [1]}, "averaging": {"enabled": True, "decay": 0.5},
         "eval": {"n_examples": 16, "steps": 2}, "device": "cpu"}])
    folder = tmp_path_factory.mktemp("export") / "run"
    Trainer(cfg, folder, progress=False, log=lambda m: None).fit()
    return folder


def _header(path):
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_round_trip_bit_equal_weights_and_predictions(run, tmp_path, capsys):
    out = tmp_path / "best.safetensors"
    assert main(["export", str(run / "best.pt"), str(out)]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out} (small_cnn, averaged weights" in said and "held-out accuracy during training" in said
    ckpt = load_checkpoint(run / "best.pt")
    assert ckpt["weights"] == "averaged"  # best.pt stores the WA model: that is what is exported
    with safe_open(str(out), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert stored.keys() == ckpt["model"].keys()
    for k, v in ckpt["model"].items():
        assert stored[k].dtype == v.dtype and torch.equal(stored[k], v), k
    m_pt, _ = model_from_checkpoint(run / "best.pt")
    m_st, raw = model_from_checkpoint(out)  # no arch given: the header says it
    assert raw["arch"] == "small_cnn" and m_st.normalize.enabled
    assert m_st.normalize.stats == m_pt.normalize.stats
    x = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(m_pt(x), m_st(x))


def test_header_model_card(run, tmp_path):
    out = tmp_path / "m.safetensors"
    export_safetensors(run / "best.pt", out)
    h = _header(out)
    ckpt = load_checkpoint(run / "best.pt")
    kwargs = ckpt["model_kwargs"]
    assert h["format"] == "rpat-model" and h["arch"] == "small_cnn" and h["num_classes"] == "10"
    assert h["in_chans"] == "1" and h["input_range"] == "[0, 1]" and h["dataset"] == "digits"
    assert json.loads(h["normalization"]) == {"mean": list(kwargs["mean"]), "std": list(kwargs["std"])}
    assert (h["threat_norm"], h["threat_eps"], h["threat_model"]) == ("linf", "32/255", "linf eps=32/255")
    assert h["weights"] == "averaged" and h["evaluated_model"].startswith("weight average (EMA decay 0.5")
    assert h["epoch"] == str(ckpt["epoch"])
    # no report beside best.pt yet: its held-out numbers, labeled as such
    assert json.loads(h["metrics"]) == {"clean": ckpt["held_out"]["clean"], "pgd": ckpt["held_out"]["pgd"]}
    assert h["metrics_source"].startswith("held-out accuracy during training (first 16 test images, epoch")
    assert all(isinstance(v, str) for v in h.values())
    # final.pt has no held-out numbers of its own: the metrics.jsonl row of its epoch
    export_safetensors(run / "final.pt", tmp_path / "f.safetensors")
    hf = _header(tmp_path / "f.safetensors")
    row = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert json.loads(hf["metrics"]) == {"clean": row["held_out_clean"], "pgd": row["held_out_pgd"]}
    assert "from metrics.jsonl" in hf["metrics_source"]


def test_eval_of_the_export_equals_eval_of_the_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    assert main(["export", str(run / "best.pt"), str(out)]) == 0
    rep_pt, rep_st = tmp_path / "pt.json", tmp_path / "st.json"
    assert main(["eval", str(run / "best.pt"), *EVAL, "--out", str(rep_pt)]) == 0
    assert main(["eval", str(out), *EVAL, "--out", str(rep_st)]) == 0  # no --arch, no --dataset
    err = capsys.readouterr().err
    assert "unverified" not in err and "inferred" not in err  # an rpat export: arch from the header, digest checked
    a, b = json.loads(rep_pt.read_text()), json.loads(rep_st.read_text())
    assert a["n_examples"] == b["n_examples"] == 16 and a["dataset"] == b["dataset"] == "digits"
    assert (a["clean"], a["pgd"], a["threat"]) == (b["clean"], b["pgd"], b["threat"])
    assert b["arch"] == "small_cnn"


def test_metrics_from_the_report_beside_the_checkpoint(run, tmp_path, capsys):
    # a report of this very file beside it (rpat eval writes best.eval.json into the run directory)
    assert main(["eval", str(run / "best.pt"), *EVAL]) == 0
    rep = json.loads((run / "best.eval.json").read_text())
    out = tmp_path / "r.safetensors"
    export_safetensors(run / "best.pt", out)
    h = _header(out)
    assert json.loads(h["metrics"]) == {"clean": rep["clean"], "pgd": rep["pgd"]}
    assert h["metrics_source"].startswith("report best.eval.json of this checkpoint: 16 digits test images, PGD-2")
    assert h["metrics_source"].endswith(", no AutoAttack")
    # AutoAttack's numbers keep their version's name: only standard AutoAttack is "aa"
    for version, names in (("standard", ("aa", "mean", "nrr")), ("apgd", ("aa_apgd", "mean_apgd", "nrr_apgd"))):
        (run / "best.eval.json").write_text(json.dumps({**rep, "autoattack": version, "aa": 40.0, "mean": 50.0,
                                                        "nrr": 48.0}))
        export_safetensors(run / "best.pt", out, overwrite=True)
        m = json.loads(_header(out)["metrics"])
        assert m == {"clean": rep["clean"], "pgd": rep["pgd"], **dict(zip(names, (40.0, 50.0, 48.0), strict=True))}
    # a report of other weights (another file's SHA-256) is not this checkpoint's: the held-out numbers instead
    (run / "best.eval.json").write_text(json.dumps({**rep, "settings": {**rep["settings"], "checkpoint": {
        "sha256": "0" * 64, "size": 1}}}))
    export_safetensors(run / "best.pt", out, overwrite=True)
    assert _header(out)["metrics_source"].startswith("held-out accuracy during training")
    (run / "best.eval.json").unlink()


def test_last_pt_exports_the_averaged_model_and_ddp_prefix_is_stripped(run, tmp_path):
    last = load_checkpoint(run / "last.pt")
    ddp = dict(last, averaged={f"module.{k}": v for k, v in last["averaged"].items()})
    atomic_save(ddp, tmp_path / "last.pt")
    out = tmp_path / "last.safetensors"
    export_safetensors(tmp_path / "last.pt", out)
    with safe_open(str(out), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert stored.keys() == last["averaged"].keys()  # no module. prefix
    assert all(torch.equal(stored[k], v) for k, v in last["averaged"].items())
    assert not all(torch.equal(stored[k], last["model"][k]) for k in stored)  # not the online model
    assert _header(out)["weights"] == "averaged"


def test_damaged_export_and_plain_safetensors(run, tmp_path):
    out = tmp_path / "m.safetensors"
    export_safetensors(run / "best.pt", out)
    data = bytearray(out.read_bytes())
    data[-3] ^= 0xFF  # a byte inside the last tensor's data
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match="is damaged"):
        load_checkpoint(bad)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(InputError, match="not a valid safetensors file"):
        load_checkpoint(tmp_path / "junk.safetensors")
    # a safetensors file rpat did not write is a plain state_dict: architecture inferred from the weights
    plain = create_model("small_cnn", num_classes=10, in_chans=1)
    save_file(plain.state_dict(), str(tmp_path / "plain.safetensors"))
    lines: list[str] = []
    model, _ = model_from_checkpoint(tmp_path / "plain.safetensors", in_chans=1, log=lines.append)
    assert any("architecture inferred from the weights: small_cnn" in m for m in lines)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in plain.state_dict().items())


def test_bad_input_is_one_line_exit_2(run, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    torch.save(create_model("small_cnn", num_classes=10, in_chans=1).state_dict(), plain)
    out = tmp_path / "x.safetensors"
    cases = [
        ([str(plain), str(out)], "is not an rpat checkpoint"),
        ([str(run / "best.pt"), str(tmp_path / "x.pt")], "must end in .safetensors"),
        ([str(tmp_path / "missing.pt"), str(out)], "not found"),
    ]
    for args, msg in cases:
        assert main(["export", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("rpat: error: ") and msg in err[0], err
    assert not out.exists()
    assert main(["export", str(run / "best.pt"), str(out)]) == 0
    before = out.read_bytes()
    assert main(["export", str(run / "final.pt"), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --overwrite" in err[0]
    assert out.read_bytes() == before  # untouched
    assert main(["export", str(run / "final.pt"), str(out), "--overwrite"]) == 0
    assert out.read_bytes() != before


def test_without_the_package_one_clear_error(run, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors", None)
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(InputError, match=r"pip install 'rpat\[safetensors\]'"):
        export_safetensors(run / "best.pt", tmp_path / "m.safetensors")
    with pytest.raises(InputError, match=r"pip install 'rpat\[safetensors\]'"):
        (tmp_path / "m.safetensors").write_bytes(b"x")
        load_checkpoint(tmp_path / "m.safetensors")

"""RobustBench's protocol settings and its model_info result file (rpat.reports.robustbench)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rpat.errors import InputError
from rpat.reports import (
    check_normalization,
    load_metadata,
    model_info_entry,
    model_info_path,
    robustbench_settings,
    update_model_info,
    write_model_info,
)
from rpat.reports.robustbench import (
    METADATA_FIELDS,
    check_metadata,
    format_accuracy,
    merge_metadata,
    protocol_deviations,
    threat_model_of,
)

TWO_DECIMALS = re.compile(r"^\d{1,3}\.\d\d$")


def _report(**over) -> dict:
    """A report shaped like the one ``rpat eval`` writes (write_report: info + RobustnessReport.to_dict())."""
    rep = {
        "checkpoint": "best.pt", "arch": "wrn-34-10", "dataset": "cifar10", "epoch": 99, "n_examples": 10000,
        "autoattack": "standard", "normalize": None,
        "settings": {"threat": {"norm": "linf", "eps": 8 / 255, "step_size": 2 / 255, "steps": 20},
                     "batch_size": 32, "autoattack": "standard"},
        "clean": 85.6, "pgd": 55.1, "aa": 53.4, "mean": 69.5, "nrr": 65.6,
        "threat": "linf eps=8/255 step=2/255 steps=20", "pgd_steps": 20, "seconds": 10.0,
        "extras": {"aa_version": "standard"},
    }
    rep.update(over)
    return rep


def _l2_report(eps: float = 0.5) -> dict:
    rep = _report(clean=88.67, aa=67.68)
    rep["settings"] = {"threat": {"norm": "l2", "eps": eps, "step_size": 0.1, "steps": 20}}
    return rep


# ----------------------------------------------------------------------------- settings


def test_settings_defaults_are_benchmarks():
    s = robustbench_settings("cifar10", "Linf")
    assert s["n_examples"] == 10000 and s["batch_size"] == 32
    assert s["eps_text"] == "8/255" and s["eps"] == pytest.approx(8 / 255)
    assert s["autoattack"] == "standard" and s["norm"] == "linf" and s["threat_model"] == "Linf"
    assert s["full_test_set"] is True and "first 10000" in s["subset"]
    l2 = robustbench_settings("cifar10", "l2")  # rpat's norm name works too
    assert (l2["threat_model"], l2["eps"], l2["eps_text"], l2["norm"]) == ("L2", 0.5, "0.5", "l2")
    assert robustbench_settings("cifar100", "linf")["eps_text"] == "8/255"
    imnet = robustbench_settings("imagenet", "Linf")
    assert imnet["eps_text"] == "4/255" and imnet["n_examples"] == 5000
    c = robustbench_settings("cifar10", "corruptions")
    assert c["eps"] is None and c["norm"] is None and c["autoattack"] is None


def test_settings_given_values_and_limits():
    s = robustbench_settings("cifar10", "Linf", n_examples=1000, batch_size=500)
    assert (s["n_examples"], s["batch_size"], s["full_test_set"]) == (1000, 500, False)
    assert robustbench_settings("cifar10", "Linf", n_examples=50_000)["n_examples"] == 10000  # the [:n] slice
    with pytest.raises(InputError, match="at most 5000"):
        robustbench_settings("imagenet", "Linf", n_examples=6000)
    with pytest.raises(InputError, match="no L2 leaderboard for cifar100"):
        robustbench_settings("cifar100", "L2")
    with pytest.raises(InputError, match="valid: cifar10, cifar100, imagenet"):
        robustbench_settings("tiny-imagenet", "Linf")
    with pytest.raises(InputError, match="batch_size"):
        robustbench_settings("cifar10", "Linf", batch_size=0)
    with pytest.raises(InputError, match="n_examples"):
        robustbench_settings("cifar10", "Linf", n_examples=0)


# ----------------------------------------------------------------------------- path


def test_model_info_path_layout(tmp_path):
    assert model_info_path(tmp_path, "cifar10", "Linf", "Rice2020Overfitting") == (
        tmp_path / "model_info" / "cifar10" / "Linf" / "Rice2020Overfitting.json")
    assert model_info_path("rb", "cifar100", "l2", "X.json") == Path("rb/model_info/cifar100/L2/X.json")
    assert model_info_path("rb", "CIFAR10", "corruptions", "Y") == Path("rb/model_info/cifar10/corruptions/Y.json")
    for bad in ("", "a/b", "..", ".hidden", "a\\b"):
        with pytest.raises(InputError, match="one file name"):
            model_info_path("rb", "cifar10", "Linf", bad)
    with pytest.raises(InputError, match="threat model"):
        model_info_path("rb", "cifar10", "L1", "X")


# ----------------------------------------------------------------------------- entry


def test_entry_has_every_field_typed_as_robustbench_writes_them():
    e = model_info_entry(_report())
    assert list(e) == ["link", "name", "authors", "additional_data", "number_forward_passes", "dataset", "venue",
                       "architecture", "eps", "clean_acc", "reported", "autoattack_acc", "unreliable", "footnote"]
    for key in ("link", "name", "authors", "venue", "architecture", "eps", "clean_acc", "autoattack_acc"):
        assert isinstance(e[key], str), key
    assert e["additional_data"] is False and e["unreliable"] is False
    assert e["number_forward_passes"] == 1 and type(e["number_forward_passes"]) is int
    assert e["footnote"] is None and e["reported"] is None  # the paper's number is not guessed
    assert (e["dataset"], e["eps"], e["architecture"]) == ("cifar10", "8/255", "wrn-34-10")
    assert (e["clean_acc"], e["autoattack_acc"]) == ("85.60", "53.40")
    # as json.dumps writes them: strings quoted, booleans lower case, footnote null
    text = json.dumps(e)
    assert '"clean_acc": "85.60"' in text and '"additional_data": false' in text and '"footnote": null' in text


def test_accuracies_are_two_decimal_strings():
    e = model_info_entry(_l2_report())
    assert (e["eps"], e["clean_acc"], e["autoattack_acc"]) == ("0.5", "88.67", "67.68")
    assert all(TWO_DECIMALS.match(e[k]) for k in ("clean_acc", "autoattack_acc"))
    assert [format_accuracy(v) for v in (0, 0.0, 7.5, 100, 53.425001)] == ["0.00", "0.00", "7.50", "100.00",
                                                                          "53.43"]
    for bad in (101.0, -1, float("nan"), "85", True):
        with pytest.raises(InputError):
            format_accuracy(bad)


def test_entry_takes_metadata_over_defaults():
    meta = {"link": "https://arxiv.org/abs/2002.11569", "name": "Overfitting in adversarially robust deep learning",
            "authors": "Leslie Rice, Eric Wong, J. Zico Kolter", "venue": "ICML 2020",
            "architecture": "WideResNet-34-20", "additional_data": True, "number_forward_passes": 2,
            "reported": 58, "unreliable": "false", "footnote": "Evaluated with rpat.", "external": "53.30"}
    e = model_info_entry(_report(), meta)
    assert e["reported"] == "58.00" and e["external"] == "53.30"
    assert e["additional_data"] is True and e["unreliable"] is False and e["number_forward_passes"] == 2
    assert e["architecture"] == "WideResNet-34-20" and e["venue"] == "ICML 2020"
    assert e["footnote"] == "Evaluated with rpat."
    assert model_info_entry(_report(), {"reported": "58"})["reported"] == "58"  # a string stays as written
    assert "external" not in model_info_entry(_report())


def test_corruptions_entry():
    rep = {"dataset": "cifar10", "arch": "resnet-18", "n_examples": 10000, "threat_model": "corruptions",
           "clean": 94.78, "corruptions_acc": 73.46, "corruptions_mce": 100.0, "normalize": None}
    e = model_info_entry(rep)
    assert threat_model_of(rep) == "corruptions"
    assert "autoattack_acc" not in e and "unreliable" not in e
    assert (e["eps"], e["corruptions_acc"], e["corruptions_mce"], e["clean_acc"]) == (None, "73.46", "100.00",
                                                                                        "94.78")
    assert e["footnote"] is None and e["number_forward_passes"] == 1


def test_protocol_deviations_refused_unless_allowed():
    assert protocol_deviations(_report()) == []
    apgd = _report(autoattack="apgd")
    with pytest.raises(InputError, match="not 'standard'"):
        model_info_entry(apgd)
    few = _report(n_examples=1000)
    with pytest.raises(InputError, match="1000 test images, not the first 10000"):
        model_info_entry(few)
    assert model_info_entry(few, allow_deviations=True)["clean_acc"] == "85.60"
    rpat_l2 = _l2_report(eps=128 / 255)  # rpat's default l2 budget is not RobustBench's 0.5
    assert protocol_deviations(rpat_l2) == ["eps 0.501961, not the leaderboard's 0.5"]
    with pytest.raises(InputError, match="no AutoAttack accuracy"):
        model_info_entry(_report(aa=None))
    with pytest.raises(InputError, match="RobustBench has no dataset"):
        model_info_entry(_report(dataset="tiny-imagenet"))


# ----------------------------------------------------------------------------- merge

EXISTING = {  # hand-written, like the leaderboard's own files (one extra key of a maintainer's)
    "link": "https://arxiv.org/abs/2002.11569",
    "name": "Overfitting in adversarially robust deep learning",
    "authors": "Leslie Rice, Eric Wong, J. Zico Kolter",
    "additional_data": False,
    "number_forward_passes": 1,
    "dataset": "cifar10",
    "venue": "ICML 2020",
    "architecture": "WideResNet-34-20",
    "eps": "8/255",
    "clean_acc": "85.34",
    "reported": "58",
    "autoattack_acc": "53.42",
    "external": "53.35",
    "footnote": "A footnote by hand.",
    "maintainer_note": "kept",
}


def test_merge_keeps_existing_metadata_and_updates_measured(tmp_path):
    path = tmp_path / "model_info" / "cifar10" / "Linf" / "Rice2020Overfitting.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(EXISTING, indent=2))
    entry = model_info_entry(_report(), {"venue": "NeurIPS 2099"})  # venue not asked to overwrite
    merged = update_model_info(path, entry)
    assert json.loads(path.read_text()) == merged
    assert (merged["clean_acc"], merged["autoattack_acc"], merged["eps"], merged["dataset"]) == (
        "85.60", "53.40", "8/255", "cifar10")
    for key in ("link", "name", "authors", "venue", "architecture", "reported", "external", "footnote",
                "maintainer_note", "additional_data", "number_forward_passes"):
        assert merged[key] == EXISTING[key], key
    assert merged["unreliable"] is False  # a field the file lacked is added
    assert list(merged)[: len(EXISTING)] == list(EXISTING)  # the file's order is kept
    again = update_model_info(path, entry, overwrite=["venue"])
    assert again["venue"] == "NeurIPS 2099" and again["link"] == EXISTING["link"]
    assert sorted(p.name for p in path.parent.iterdir()) == ["Rice2020Overfitting.json"]  # no temp files


def test_merge_none_never_overwrites(tmp_path):
    path = tmp_path / "C.json"
    path.write_text(json.dumps({"eps": "8/255", "corruptions_acc": "70.00", "corruptions_mce": "30.00",
                                "clean_acc": "90.00", "name": "kept"}))
    rep = {"dataset": "cifar10", "arch": "r18", "n_examples": 10000, "threat_model": "corruptions",
           "clean": 91.0, "corruptions_acc": 71.0}
    merged = update_model_info(path, model_info_entry(rep))
    assert merged["eps"] == "8/255" and merged["corruptions_mce"] == "30.00"
    assert (merged["clean_acc"], merged["corruptions_acc"], merged["name"]) == ("91.00", "71.00", "kept")


def test_merge_fills_the_nulls_robustbench_leaves(tmp_path):
    # what update_json writes for a new model: every ModelInfo field, the unmeasured ones null
    path = tmp_path / "R.json"
    path.write_text(json.dumps({"link": None, "name": None, "authors": None, "additional_data": None,
                                "number_forward_passes": None, "dataset": "cifar10", "venue": None,
                                "architecture": None, "eps": 0.03137254901960784, "clean_acc": "85.6",
                                "reported": None, "corruptions_acc": None, "corruptions_acc_3d": None,
                                "corruptions_mce": None, "corruptions_mce_3d": None, "autoattack_acc": "53.4",
                                "footnote": None}))
    merged = update_model_info(path, model_info_entry(_report(), {"name": "A title"}))
    assert (merged["name"], merged["link"], merged["architecture"]) == ("A title", "", "wrn-34-10")
    assert (merged["additional_data"], merged["number_forward_passes"]) == (False, 1)
    assert (merged["eps"], merged["clean_acc"], merged["autoattack_acc"]) == ("8/255", "85.60", "53.40")
    assert merged["reported"] is None and merged["footnote"] is None and merged["corruptions_acc"] is None


def test_new_file_is_the_entry_and_bad_files_are_refused(tmp_path):
    path = model_info_path(tmp_path, "cifar10", "Linf", "New2026Model")
    entry = model_info_entry(_report())
    assert update_model_info(path, entry) == entry and json.loads(path.read_text()) == entry
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(InputError, match="not a readable JSON"):
        update_model_info(bad, entry)
    assert bad.read_text() == "{not json"
    bad.write_text("[1, 2]")
    with pytest.raises(InputError, match="not an object"):
        update_model_info(bad, entry)


def test_write_model_info_end_to_end(tmp_path):
    path, merged = write_model_info(tmp_path, "Rice2020Overfitting", _l2_report(), {"authors": "A. B."})
    assert path == tmp_path / "model_info" / "cifar10" / "L2" / "Rice2020Overfitting.json"
    assert merged["authors"] == "A. B." and merged["eps"] == "0.5"
    path.write_text(json.dumps({**merged, "authors": "By hand", "link": "https://x"}))
    _, again = write_model_info(tmp_path, "Rice2020Overfitting", _l2_report(), {"venue": "ICML 2020"})
    assert (again["authors"], again["link"], again["venue"]) == ("By hand", "https://x", "ICML 2020")


# ----------------------------------------------------------------------------- metadata


def test_metadata_yaml(tmp_path):
    f = tmp_path / "meta.yaml"
    f.write_text("link: https://arxiv.org/abs/1\nauthors: A, B\nadditional_data: true\n"
                 "number_forward_passes: 1\nreported: 58\nfootnote: null\n")
    assert load_metadata(f) == {"link": "https://arxiv.org/abs/1", "authors": "A, B", "additional_data": True,
                                "number_forward_passes": 1, "reported": "58.00"}
    f.write_text("")
    assert load_metadata(f) == {}


def test_metadata_unknown_key_is_one_message(tmp_path):
    f = tmp_path / "meta.yaml"
    f.write_text("venu: ICML 2020\nlink: x\nclean_acc: 90\n")
    with pytest.raises(InputError) as err:
        load_metadata(f)
    msg = str(err.value)
    assert "\n" not in msg and "unknown key(s) venu, clean_acc" in msg and "measured by the evaluation" in msg
    assert msg.endswith("valid: " + ", ".join(METADATA_FIELDS))


def test_metadata_bad_values_and_files(tmp_path):
    f = tmp_path / "meta.yaml"
    f.write_text("- a list\n")
    with pytest.raises(InputError, match="expected a mapping"):
        load_metadata(f)
    f.write_text("link: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_metadata(f)
    with pytest.raises(InputError, match="cannot read"):
        load_metadata(tmp_path / "missing.yaml")
    for meta, what in (({"number_forward_passes": 0}, "integer >= 1"), ({"number_forward_passes": "two"}, "integer"),
                       ({"additional_data": "maybe"}, "true or false"), ({"reported": "n/a"}, "accuracy"),
                       ({"reported": 120}, "0-100"), ({"name": ["x"]}, "text")):
        with pytest.raises(InputError, match=what):
            check_metadata(meta)


def test_merge_metadata_flags_win_and_none_is_not_given():
    file_meta = {"venue": "ICML 2020", "authors": "A"}
    flags = {"venue": "ICLR 2021", "authors": None, "additional_data": "yes"}
    assert merge_metadata(file_meta, flags, None) == {"venue": "ICLR 2021", "authors": "A", "additional_data": True}


# ----------------------------------------------------------------------------- normalization


def test_check_normalization():
    check_normalization(None)
    check_normalization({"mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]}, "cifar10")
    check_normalization({"mean": [0.5], "std": [0.5]}, "cifar100")  # one value for all channels
    check_normalization({"mean": [0.3], "std": [0.4]}, "digits")
    with pytest.raises(InputError, match="not representable for cifar10 \\(3 channels\\)"):
        check_normalization({"mean": [0.5, 0.5], "std": [0.5, 0.5]}, "cifar10")
    with pytest.raises(InputError, match="1 channels"):
        check_normalization({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5]}, "digits")
    with pytest.raises(InputError, match="positive"):
        check_normalization({"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.0, 0.5]}, "cifar10")
    with pytest.raises(InputError, match="mean"):
        check_normalization({"mu": [0.5]}, "cifar10")
    with pytest.raises(InputError, match="not representable"):
        model_info_entry(_report(normalize={"mean": [0.5] * 4, "std": [0.5] * 4}))
    e = model_info_entry(_report(normalize={"mean": [0.4914, 0.4822, 0.4465], "std": [0.2471, 0.2435, 0.2616]}))
    assert e["clean_acc"] == "85.60"

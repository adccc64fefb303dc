"""The model zoo: shapes, proxies, parameter counts, normalization, registry and weight loading."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from rpat.errors import InputError
from rpat.models import PROXIES, ImageClassifier, create_model, infer_arch, list_models, load_weights
from rpat.models.wide_resnet import WideResNet

CANONICAL = ["dm_preact_resnet18_swish", "dm_wrn28_10_swish", "dm_wrn70_16_swish", "mobilenetv2", "preact_resnet18",
             "resnet18", "small_cnn", "vgg16", "wrn28_10", "wrn34_10"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_proxies(model: ImageClassifier, x: torch.Tensor, third_shape: tuple[int, ...], embed: int) -> None:
    """forward / forward_proxies / forward_proxy shapes, and logits identical to forward."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        proxies = model.forward_proxies(x)
        assert set(proxies) == set(PROXIES)
        assert logits.shape == (x.shape[0], model.num_classes)
        assert torch.equal(proxies["logits"], logits)
        assert proxies["second_to_last"].shape == (x.shape[0], embed)
        assert proxies["third_to_last"].shape == (x.shape[0], *third_shape)
        assert torch.equal(model.forward_features(x), proxies["second_to_last"])
        assert torch.equal(model.forward_proxy(x, "third_to_last"), proxies["third_to_last"])
        assert torch.equal(model.forward_proxy(x), logits)


# --------------------------------------------------------------------------- registry


def test_list_models_is_canonical_and_sorted():
    assert list_models() == CANONICAL


@pytest.mark.parametrize(
    "alias, canonical",
    [("preactresnet18", "preact_resnet18"), ("PreActResNet18", "preact_resnet18"), ("ResNet-18", "resnet18"),
     ("wrn-34-10", "wrn34_10"), ("wideresnet34_10", "wrn34_10"), ("WRN-28-10", "wrn28_10"),
     ("smallcnn", "small_cnn")],
)
def test_aliases_resolve_to_canonical_names(alias, canonical):
    with torch.device("meta"):  # no allocation: only the registry is under test
        model = create_model(alias)
    assert model.arch == canonical


def test_unknown_model_lists_valid_names_on_one_line():
    with pytest.raises(InputError) as err:
        create_model("vgg19")
    assert str(err.value) == "unknown model 'vgg19'; valid: " + ", ".join(CANONICAL)


def test_bad_arguments_are_input_errors():
    with pytest.raises(InputError, match="takes no argument 'dropout'"):
        create_model("resnet18", dropout=0.3)
    with pytest.raises(InputError, match="num_classes"):
        create_model("small_cnn", num_classes=0)
    with pytest.raises(InputError, match="in_chans=1"):
        create_model("small_cnn", in_chans=1, mean=CIFAR_MEAN, std=CIFAR_STD)
    with pytest.raises(InputError, match="depth"):
        WideResNet(depth=30, widen_factor=2)
    model = create_model("small_cnn")
    with pytest.raises(InputError, match="unknown proxy"):
        model.forward_proxy(torch.rand(1, 3, 32, 32), "penultimate")


# --------------------------------------------------------------------------- shapes and proxies


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18"])
@pytest.mark.parametrize("size", [32, 64])
def test_resnet_shapes_and_proxies(name, size):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7)
    check_proxies(model, torch.rand(2, 3, size, size), (256, size // 4, size // 4), 512)


def test_small_cnn_shapes_rgb_and_digits():
    torch.manual_seed(0)
    check_proxies(create_model("small_cnn"), torch.rand(3, 3, 32, 32), (64, 4, 4), 256)
    digits = create_model("small_cnn", num_classes=10, in_chans=1)
    check_proxies(digits, torch.rand(3, 1, 8, 8), (64, 4, 4), 256)
    wide = create_model("small_cnn", num_classes=5, width=2)
    check_proxies(wide, torch.rand(2, 3, 64, 64), (128, 4, 4), 256)


def test_input_gradients_flow_in_train_mode():
    torch.manual_seed(0)
    model = create_model("small_cnn", in_chans=1)
    x = torch.rand(4, 1, 8, 8, requires_grad=True)
    F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3])).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.fixture(scope="module")
def wrn34_10() -> ImageClassifier:
    torch.manual_seed(0)
    return create_model("wrn34_10")  # big: built once


def test_wrn34_10_count_shapes_and_proxies(wrn34_10):
    assert n_params(wrn34_10) == 46_160_474  # the published WRN-34-10 count (10 classes)
    check_proxies(wrn34_10, torch.rand(2, 3, 32, 32), (320, 16, 16), 640)


def test_wrn28_10_count_and_shapes_on_meta_device():
    with torch.device("meta"):
        model = create_model("wrn28_10")
        out = model.forward_proxies(torch.empty(2, 3, 32, 32))
    assert n_params(model) == 36_479_194  # the published WRN-28-10 count (10 classes)
    assert out["logits"].shape == (2, 10)
    assert out["second_to_last"].shape == (2, 640)
    assert out["third_to_last"].shape == (2, 320, 16, 16)


def test_parameter_counts():
    with torch.device("meta"):
        counts = {n: n_params(create_model(n)) for n in ("resnet18", "preact_resnet18", "small_cnn")}
        resnet18_100 = n_params(create_model("resnet18", num_classes=100))
        wrn_100 = n_params(create_model("wrn34_10", num_classes=100))
    # resnet18: the published CIFAR ResNet-18 count. preact_resnet18: 11,171,146 of the PreActResNet
    # without a final BN + 1,024 for the final ``bn`` of the robust-overfitting / fast-AT variant.
    assert counts == {"resnet18": 11_173_962, "preact_resnet18": 11_172_170, "small_cnn": 330_730}
    assert resnet18_100 == 11_173_962 + 90 * 513
    assert wrn_100 == 46_160_474 + 90 * 641


def test_public_parameter_names():
    with torch.device("meta"):
        keys = {n: set(create_model(n).state_dict()) for n in ("resnet18", "preact_resnet18", "wrn34_10")}
    assert {"conv1.weight", "bn1.running_var", "layer2.0.shortcut.0.weight", "layer2.0.shortcut.1.weight",
            "layer4.1.bn2.weight", "linear.weight"} <= keys["resnet18"]
    assert {"conv1.weight", "layer1.0.bn1.weight", "layer2.0.shortcut.0.weight", "layer4.1.conv2.weight",
            "bn.weight", "linear.bias"} <= keys["preact_resnet18"]
    assert not any(k.startswith(("bn1.", "layer2.0.shortcut.1")) for k in keys["preact_resnet18"])
    assert not any(k.startswith("layer1.0.shortcut") for k in keys["preact_resnet18"])
    assert {"conv1.weight", "block1.layer.0.convShortcut.weight", "block2.layer.0.convShortcut.weight",
            "block3.layer.4.conv2.weight", "bn1.weight", "fc.weight", "fc.bias"} <= keys["wrn34_10"]
    assert not any(k.startswith(("block1.layer.1.convShortcut", "sub_block1")) for k in keys["wrn34_10"])
    assert not any("normalize" in k for ks in keys.values() for k in ks)


# --------------------------------------------------------------------------- normalization


@pytest.mark.parametrize("name", ["resnet18", "preact_resnet18", "small_cnn"])
def test_normalization_inside_the_model(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, mean=CIFAR_MEAN, std=CIFAR_STD).eval()
    twin = create_model(name, num_classes=10).eval()
    assert set(model.state_dict()) == set(twin.state_dict())  # buffers are non-persistent
    twin.load_state_dict(model.state_dict(), strict=True)
    x = torch.rand(3, 3, 32, 32)
    mean = torch.tensor(CIFAR_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), twin((x - mean) / std), rtol=0, atol=1e-6)
        assert not torch.allclose(model(x), twin(x))


# --------------------------------------------------------------------------- public checkpoint


def load_jpegs(root: Path, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``root/<class>/*.jpg`` -> images ``(N, 3, 32, 32)`` in [0, 1] and labels (classes sorted)."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    xs, ys = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).glob("*.jpg"))[:per_class]:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            xs.append(torch.from_numpy(arr).permute(2, 0, 1))
            ys.append(label)
    return torch.stack(xs), torch.tensor(ys)


def test_pyautoattack_checkpoint_loads_strict_and_classifies_cifar10(cifar10_jpeg_subset):
    path = importlib.resources.files("pyautoattack") / "examples" / "model_test.pt"
    with importlib.resources.as_file(path) as p:
        state = torch.load(p, weights_only=True, map_location="cpu")
    model = create_model("resnet18")  # no normalization: the checkpoint takes [0, 1] inputs
    model.load_state_dict(state, strict=True)
    model.eval()
    x, y = load_jpegs(cifar10_jpeg_subset / "test", per_class=20)
    assert x.shape == (200, 3, 32, 32)
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    # Measured: 0.835 on these 200 JPEGs (0.838 on the first 1000); chance is 0.1.
    assert acc >= 0.75, acc


# --------------------------------------------------------------------------- load_weights


def test_load_weights_strips_wrapper_prefixes():
    torch.manual_seed(0)
    src = create_model("small_cnn", in_chans=1)
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        dst = create_model("small_cnn", in_chans=1)
        load_weights(dst, {prefix + k: v for k, v in src.state_dict().items()}, arch="small_cnn")
        for k, v in src.state_dict().items():
            assert torch.equal(dst.state_dict()[k], v)


def test_load_weights_drops_trades_sub_block_and_tolerates_old_bn_keys():
    torch.manual_seed(0)
    src = WideResNet(depth=10, widen_factor=2)
    state = dict(src.state_dict())
    state.update({f"sub_block1.{k[len('block1.'):]}": v.clone() for k, v in src.state_dict().items()
                  if k.startswith("block1.")})
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # pre-0.4.1 style
    dst = WideResNet(depth=10, widen_factor=2)
    load_weights(dst, state)
    assert torch.equal(dst.fc.weight, src.fc.weight)
    assert torch.equal(dst.block3.layer[0].convShortcut.weight, src.block3.layer[0].convShortcut.weight)


def test_load_weights_wrong_architecture_names_first_key():
    preact = create_model("preact_resnet18").state_dict()
    with pytest.raises(InputError) as err:
        load_weights(create_model("resnet18"), preact, arch="resnet18")
    msg = str(err.value)
    assert msg.startswith("checkpoint does not fit resnet18: missing key 'bn1.weight'")
    assert "its keys are those of preact_resnet18: check --arch" in msg and "\n" not in msg
    small = create_model("small_cnn").state_dict()
    with pytest.raises(InputError, match="checkpoint does not fit small_cnn: unexpected key 'extra.weight'"):
        load_weights(create_model("small_cnn"), {**small, "extra.weight": torch.zeros(1)})


def test_load_weights_wrong_input_channels():
    state = create_model("small_cnn", in_chans=3).state_dict()
    with pytest.raises(InputError) as err:
        load_weights(create_model("small_cnn", in_chans=1), state)
    msg = str(err.value)
    assert "shape of 'features.0.0.weight' is (32, 3, 3, 3) in the checkpoint but (32, 1, 3, 3)" in msg
    assert "3 input channel(s), the model 1" in msg


def test_load_weights_looks_through_wrappers():
    torch.manual_seed(0)
    src = create_model("small_cnn", in_chans=1)
    dst = create_model("small_cnn", in_chans=1)
    load_weights(torch.nn.DataParallel(dst), src.state_dict())
    assert torch.equal(dst.fc2.weight, src.fc2.weight)


def test_load_weights_wrong_num_classes_names_head_shape():
    state = create_model("resnet18", num_classes=100).state_dict()
    model = create_model("resnet18", num_classes=10)
    with pytest.raises(InputError) as err:
        load_weights(model, state, arch="resnet18")
    msg = str(err.value)
    assert "shape of 'linear.weight' is (100, 512) in the checkpoint but (10, 512) in the model" in msg
    assert "100 classes" in msg and "--arch" in msg


def test_infer_arch_from_keys_and_shapes():
    resnet = create_model("resnet18", num_classes=10).state_dict()
    small = create_model("small_cnn", num_classes=10, in_chans=1).state_dict()
    assert infer_arch(resnet) == ["resnet18"]
    assert infer_arch(small) == ["small_cnn"]
    # the renames load_weights applies: wrapper prefixes, old BatchNorm keys
    assert infer_arch({f"module._orig_mod.{k}": v for k, v in resnet.items()}) == ["resnet18"]
    assert infer_arch({k: v for k, v in resnet.items() if not k.endswith("num_batches_tracked")}) == ["resnet18"]
    # sizes: free by default, fixed when given
    assert infer_arch(create_model("resnet18", num_classes=100).state_dict()) == ["resnet18"]
    assert infer_arch(resnet, num_classes=10, in_chans=3) == ["resnet18"]
    assert infer_arch(resnet, num_classes=100) == [] and infer_arch(small, in_chans=3) == []
    # one key missing, one shape changed, or no state_dict at all: nothing fits
    assert infer_arch({k: v for k, v in resnet.items() if k != "linear.bias"}) == []
    assert infer_arch({**resnet, "layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}) == []
    assert infer_arch({"encoder.weight": torch.zeros(3)}) == [] and infer_arch({}) == []
    assert infer_arch({"conv1.weight": 3}) == []


def test_infer_arch_tells_the_two_wide_resnets_and_preact_apart():
    with torch.device("meta"):
        sds = {name: create_model(name).state_dict() for name in ("preact_resnet18", "wrn28_10", "wrn34_10")}
    for name, sd in sds.items():
        assert infer_arch(sd) == [name]


# --------------------------------------------------------------------------- trains


def test_small_cnn_fits_a_fixed_batch():
    torch.manual_seed(0)
    model = create_model("small_cnn", in_chans=1)
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    first = None
    for _ in range(30):
        loss = F.cross_entropy(model(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first

"""The networks of issue 21: the Swish DM WideResNets / PreActResNet in RobustBench's layout, and the RPAT
release's VGG16 and MobileNetV2.

The published layouts are written out below as (name, shape) lists, taken from RobustBench's
``robustbench/model_zoo/architectures/dm_wide_resnet.py`` (``DMWideResNet``, ``DMPreActResNet``) and the
authors' release (``RPAT_SOTAs/networks/vgg.py``, ``mobilenetv2.py``). The parameter counts are computed
from the layer sizes by hand (``_wrn_count`` etc.), not read from the modules. ``_ref_*`` are plain
functional forwards written from the published code, reading tensors by their published names: a state_dict
in that layout must give the same logits in rpat's module.
"""

from __future__ import annotations

import json
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F

from rpat.checkpoint import model_from_checkpoint
from rpat.cli import main
from rpat.data import evaluation_subset, load_dataset
from rpat.errors import InputError
from rpat.models import create_model, infer_arch, list_models, load_weights, resolve_model_name
from rpat.models.averaging import WeightAverage
from rpat.models.dm_resnet import DMPreActResNet, DMWideResNet, same_pad
from rpat.models.normalization import add_normalization

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # RobustBench's CIFAR10_MEAN / CIFAR10_STD
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    return [(f"{prefix}.weight", (c,)), (f"{prefix}.bias", (c,)), (f"{prefix}.running_mean", (c,)),
            (f"{prefix}.running_var", (c,)), (f"{prefix}.num_batches_tracked", ())]


# ---- the published layouts ---------------------------------------------------------------------------
#: DMWideResNet(depth=28, width=10): the first 17 and the last 17 state_dict entries.
DM_WRN28_10_HEAD = [
    ("mean", (3, 1, 1)), ("std", (3, 1, 1)), ("init_conv.weight", (16, 3, 3, 3)),
    ("layer.0.block.0.batchnorm_0.weight", (16,)), ("layer.0.block.0.batchnorm_0.bias", (16,)),
    ("layer.0.block.0.batchnorm_0.running_mean", (16,)), ("layer.0.block.0.batchnorm_0.running_var", (16,)),
    ("layer.0.block.0.batchnorm_0.num_batches_tracked", ()), ("layer.0.block.0.conv_0.weight", (160, 16, 3, 3)),
    ("layer.0.block.0.batchnorm_1.weight", (160,)), ("layer.0.block.0.batchnorm_1.bias", (160,)),
    ("layer.0.block.0.batchnorm_1.running_mean", (160,)), ("layer.0.block.0.batchnorm_1.running_var", (160,)),
    ("layer.0.block.0.batchnorm_1.num_batches_tracked", ()), ("layer.0.block.0.conv_1.weight", (160, 160, 3, 3)),
    ("layer.0.block.0.shortcut.weight", (160, 16, 1, 1)), ("layer.0.block.1.batchnorm_0.weight", (160,)),
]
DM_WRN28_10_TAIL = [
    ("layer.2.block.3.batchnorm_0.weight", (640,)), ("layer.2.block.3.batchnorm_0.bias", (640,)),
    ("layer.2.block.3.batchnorm_0.running_mean", (640,)), ("layer.2.block.3.batchnorm_0.running_var", (640,)),
    ("layer.2.block.3.batchnorm_0.num_batches_tracked", ()), ("layer.2.block.3.conv_0.weight", (640, 640, 3, 3)),
    ("layer.2.block.3.batchnorm_1.weight", (640,)), ("layer.2.block.3.batchnorm_1.bias", (640,)),
    ("layer.2.block.3.batchnorm_1.running_mean", (640,)), ("layer.2.block.3.batchnorm_1.running_var", (640,)),
    ("layer.2.block.3.batchnorm_1.num_batches_tracked", ()), ("layer.2.block.3.conv_1.weight", (640, 640, 3, 3)),
    ("batchnorm.weight", (640,)), ("batchnorm.bias", (640,)), ("batchnorm.running_mean", (640,)),
    ("batchnorm.running_var", (640,)), ("batchnorm.num_batches_tracked", ()),
]
DM_WRN28_10_LOGITS = [("logits.weight", (10, 640)), ("logits.bias", (10,))]
#: the other two shortcuts of WRN-28-10 (first block of groups 1 and 2 only)
DM_WRN28_10_SHORTCUTS = {"layer.0.block.0.shortcut.weight": (160, 16, 1, 1),
                         "layer.1.block.0.shortcut.weight": (320, 160, 1, 1),
                         "layer.2.block.0.shortcut.weight": (640, 320, 1, 1)}

#: DMPreActResNet(depth=18): the first 15 entries, the shortcuts (3x3 convs) and the last 8.
DM_PREACT18_HEAD = [
    ("mean", (3, 1, 1)), ("std", (3, 1, 1)), ("conv_2d.weight", (64, 3, 3, 3)),
    *_bn("layer_0.0.batchnorm_0", 64), ("layer_0.0.conv_2d_1.weight", (64, 64, 3, 3)),
    *_bn("layer_0.0.batchnorm_1", 64), ("layer_0.0.conv_2d_2.weight", (64, 64, 3, 3)),
]
DM_PREACT18_SHORTCUTS = {"layer_1.0.shortcut.weight": (128, 64, 3, 3), "layer_2.0.shortcut.weight": (256, 128, 3, 3),
                         "layer_3.0.shortcut.weight": (512, 256, 3, 3)}
DM_PREACT18_TAIL = [("layer_3.1.conv_2d_2.weight", (512, 512, 3, 3)), *_bn("batchnorm", 512),
                    ("logits.weight", (10, 512)), ("logits.bias", (10,))]

#: the release's VGG16: its first conv block, the last conv block, and the three linear blocks.
VGG16_HEAD = [("layer11.0.weight", (64, 3, 3, 3)), ("layer11.0.bias", (64,)), *_bn("layer11.1", 64),
              ("layer12.0.weight", (64, 64, 3, 3))]
VGG16_TAIL = [("layer43.0.weight", (512, 512, 3, 3)), ("layer43.0.bias", (512,)), *_bn("layer43.1", 512),
              ("layer6.0.weight", (512, 512)), ("layer6.0.bias", (512,)), *_bn("layer6.1", 512),
              ("layer7.0.weight", (512, 512)), ("layer7.0.bias", (512,)), *_bn("layer7.1", 512),
              ("layer8.weight", (10, 512)), ("layer8.bias", (10,))]
VGG16_CONVS = ["layer11", "layer12", "layer21", "layer22", "layer31", "layer32", "layer33",
               "layer41", "layer42", "layer43"]

#: the release's CIFAR MobileNetV2: the stem, the first block (with its conv+BN shortcut), the end.
MOBILENETV2_HEAD = [("conv1.weight", (32, 3, 3, 3)), *_bn("bn1", 32), ("layers.0.conv1.weight", (32, 32, 1, 1)),
                    *_bn("layers.0.bn1", 32), ("layers.0.conv2.weight", (32, 1, 3, 3)), *_bn("layers.0.bn2", 32),
                    ("layers.0.conv3.weight", (16, 32, 1, 1)), *_bn("layers.0.bn3", 16),
                    ("layers.0.shortcut.0.weight", (16, 32, 1, 1)), *_bn("layers.0.shortcut.1", 16)]
MOBILENETV2_TAIL = [("layers.16.conv3.weight", (320, 960, 1, 1)), *_bn("layers.16.bn3", 320),
                    ("layers.16.shortcut.0.weight", (320, 160, 1, 1)), *_bn("layers.16.shortcut.1", 320),
                    ("conv2.weight", (1280, 320, 1, 1)), *_bn("bn2", 1280),
                    ("linear.weight", (10, 1280)), ("linear.bias", (10,))]


def rb_wrn_layout(depth: int, width: int, num_classes: int = 10, c: int = 3) -> list[tuple[str, tuple[int, ...]]]:
    """RobustBench's DMWideResNet state_dict layout, in registration order (from its source)."""
    n, ch = (depth - 4) // 6, (16, 16 * width, 32 * width, 64 * width)
    out = [("mean", (c, 1, 1)), ("std", (c, 1, 1)), ("init_conv.weight", (16, c, 3, 3))]
    for g in range(3):
        for i in range(n):
            cin, cout, p = (ch[g] if i == 0 else ch[g + 1]), ch[g + 1], f"layer.{g}.block.{i}"
            out += [*_bn(f"{p}.batchnorm_0", cin), (f"{p}.conv_0.weight", (cout, cin, 3, 3)),
                    *_bn(f"{p}.batchnorm_1", cout), (f"{p}.conv_1.weight", (cout, cout, 3, 3))]
            if cin != cout:
                out.append((f"{p}.shortcut.weight", (cout, cin, 1, 1)))
    return out + [*_bn("batchnorm", ch[3]), ("logits.weight", (num_classes, ch[3])), ("logits.bias", (num_classes,))]


def rb_preact_layout(num_classes: int = 10) -> list[tuple[str, tuple[int, ...]]]:
    """RobustBench's DMPreActResNet(depth=18) state_dict layout."""
    out = [("mean", (3, 1, 1)), ("std", (3, 1, 1)), ("conv_2d.weight", (64, 3, 3, 3))]
    cin = 64
    for s, cout in enumerate((64, 128, 256, 512)):
        for i in range(2):
            p, ci = f"layer_{s}.{i}", cin if i == 0 else cout
            out += [*_bn(f"{p}.batchnorm_0", ci), (f"{p}.conv_2d_1.weight", (cout, ci, 3, 3)),
                    *_bn(f"{p}.batchnorm_1", cout), (f"{p}.conv_2d_2.weight", (cout, cout, 3, 3))]
            if i == 0 and (s > 0 or ci != cout):
                out.append((f"{p}.shortcut.weight", (cout, ci, 3, 3)))
        cin = cout
    return out + [*_bn("batchnorm", 512), ("logits.weight", (num_classes, 512)), ("logits.bias", (num_classes,))]


def _wrn_count(depth: int, k: int, classes: int = 10) -> int:
    n, ch = (depth - 4) // 6, (16, 16 * k, 32 * k, 64 * k)
    total = 16 * 3 * 9
    for g in range(3):
        cin, c = ch[g], ch[g + 1]
        total += 2 * cin + 9 * cin * c + 2 * c + 9 * c * c + (cin * c if cin != c else 0)
        total += (n - 1) * (4 * c + 18 * c * c)
    return total + 2 * ch[3] + ch[3] * classes + classes


def _preact18_count(classes: int = 10) -> int:
    total, cin = 64 * 3 * 9, 64
    for s, c in enumerate((64, 128, 256, 512)):
        total += 2 * cin + 9 * cin * c + 2 * c + 9 * c * c + (9 * cin * c if s > 0 else 0)  # block 0 (+3x3 shortcut)
        total += 4 * c + 18 * c * c  # block 1
        cin = c
    return total + 2 * 512 + 512 * classes + classes


def _vgg16_count(classes: int = 10) -> int:
    chans = [3, 64, 64, 128, 128, 256, 256, 256, 512, 512, 512]
    convs = sum(9 * a * b + b + 2 * b for a, b in zip(chans[:-1], chans[1:], strict=True))
    return convs + 2 * (512 * 512 + 512 + 2 * 512) + 512 * classes + classes


def _mobilenetv2_count(classes: int = 10) -> int:
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    total, cin = 32 * 3 * 9 + 2 * 32, 32
    for e, c, n, s in cfg:
        for i in range(n):
            p = e * cin
            total += cin * p + 2 * p + 9 * p + 2 * p + p * c + 2 * c
            if (s if i == 0 else 1) == 1 and cin != c:
                total += cin * c + 2 * c
            cin = c
    return total + 320 * 1280 + 2 * 1280 + 1280 * classes + classes


def _layout(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _nparams(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _random_state(layout: list[tuple[str, tuple[int, ...]]], seed: int = 0,
                  mean: tuple[float, ...] = CIFAR10_MEAN, std: tuple[float, ...] = CIFAR10_STD) -> OrderedDict:
    """A state_dict in a published layout with random weights and BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, shape in layout:
        if name == "mean":
            sd[name] = torch.tensor(mean).view(shape)
        elif name == "std":
            sd[name] = torch.tensor(std).view(shape)
        elif name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(7)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=g) + 0.5
        elif name.endswith(("running_mean", "bias")):
            sd[name] = 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:  # BatchNorm weight
            sd[name] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            fan_in = int(torch.tensor(shape[1:]).prod())
            sd[name] = torch.randn(shape, generator=g) * (1.0 / fan_in) ** 0.5
    return sd


# ---- functional forwards written from the published code -----------------------------------------------
def _ref_bn(sd: dict, p: str, t: torch.Tensor) -> torch.Tensor:
    return F.batch_norm(t, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        False, 0.0, 1e-5)


def _swish(t: torch.Tensor) -> torch.Tensor:
    return t * torch.sigmoid(t)


def _tf_same(t: torch.Tensor, stride: int) -> torch.Tensor:
    return F.pad(t, (1, 1, 1, 1)) if stride == 1 else F.pad(t, (0, 1, 0, 1))


def _ref_dm_wrn(sd: dict, x: torch.Tensor, depth: int) -> torch.Tensor:
    """RobustBench's DMWideResNet.forward (eval mode), from its source."""
    n = (depth - 4) // 6
    out = F.conv2d((x - sd["mean"]) / sd["std"], sd["init_conv.weight"], padding=1)
    for g in range(3):
        for i in range(n):
            p, s = f"layer.{g}.block.{i}", (1 if g == 0 or i > 0 else 2)
            has_shortcut = f"{p}.shortcut.weight" in sd
            act = _swish(_ref_bn(sd, f"{p}.batchnorm_0", out))
            o = F.conv2d(_tf_same(act, s), sd[f"{p}.conv_0.weight"], stride=s)
            o = F.conv2d(_swish(_ref_bn(sd, f"{p}.batchnorm_1", o)), sd[f"{p}.conv_1.weight"], padding=1)
            out = (F.conv2d(act, sd[f"{p}.shortcut.weight"], stride=s) if has_shortcut else out) + o
    out = F.avg_pool2d(_swish(_ref_bn(sd, "batchnorm", out)), 8)
    return F.linear(out.view(out.shape[0], -1), sd["logits.weight"], sd["logits.bias"])


def _ref_dm_preact(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """RobustBench's DMPreActResNet.forward (eval mode), from its source."""
    out = F.conv2d((x - sd["mean"]) / sd["std"], sd["conv_2d.weight"], padding=1)
    for stage in range(4):
        for i in range(2):
            p, s = f"layer_{stage}.{i}", (2 if stage > 0 and i == 0 else 1)
            o = _swish(_ref_bn(sd, f"{p}.batchnorm_0", out))
            short = F.conv2d(_tf_same(out, s), sd[f"{p}.shortcut.weight"], stride=s) \
                if f"{p}.shortcut.weight" in sd else out
            o = F.conv2d(_tf_same(o, s), sd[f"{p}.conv_2d_1.weight"], stride=s)
            out = F.conv2d(_swish(_ref_bn(sd, f"{p}.batchnorm_1", o)), sd[f"{p}.conv_2d_2.weight"], padding=1) + short
    out = F.avg_pool2d(_swish(_ref_bn(sd, "batchnorm", out)), 4)
    return F.linear(out.view(out.shape[0], -1), sd["logits.weight"], sd["logits.bias"])


def _ref_vgg16(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The release's VGG16.forward (eval mode, no normalization), from its source."""
    out = x
    for name in VGG16_CONVS:
        out = F.relu(_ref_bn(sd, f"{name}.1", F.conv2d(out, sd[f"{name}.0.weight"], sd[f"{name}.0.bias"], padding=1)))
        if name in ("layer12", "layer22", "layer33", "layer43"):
            out = F.max_pool2d(out, 2, 2)
    out = F.max_pool2d(out, 2, 2).view(x.shape[0], -1)
    for fc in ("layer6", "layer7"):
        out = F.relu(_ref_bn(sd, f"{fc}.1", F.linear(out, sd[f"{fc}.0.weight"], sd[f"{fc}.0.bias"])))
    return F.linear(out, sd["layer8.weight"], sd["layer8.bias"])


def _ref_mobilenetv2(sd: dict, x: torch.Tensor) -> torch.Tensor:
    """The release's MobileNetV2.forward (eval mode, no normalization), from its source."""
    cfg = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]
    out = F.relu(_ref_bn(sd, "bn1", F.conv2d(x, sd["conv1.weight"], padding=1)))
    i = 0
    for _, _, n, stride in cfg:
        for j in range(n):
            p, s = f"layers.{i}", (stride if j == 0 else 1)
            planes = sd[f"{p}.conv1.weight"].shape[0]
            o = F.relu(_ref_bn(sd, f"{p}.bn1", F.conv2d(out, sd[f"{p}.conv1.weight"])))
            o = F.relu(_ref_bn(sd, f"{p}.bn2", F.conv2d(o, sd[f"{p}.conv2.weight"], stride=s, padding=1,
                                                        groups=planes)))
            o = _ref_bn(sd, f"{p}.bn3", F.conv2d(o, sd[f"{p}.conv3.weight"]))
            if s == 1:
                short = (_ref_bn(sd, f"{p}.shortcut.1", F.conv2d(out, sd[f"{p}.shortcut.0.weight"]))
                         if f"{p}.shortcut.0.weight" in sd else out)
                o = o + short
            out, i = o, i + 1
    out = F.avg_pool2d(F.relu(_ref_bn(sd, "bn2", F.conv2d(out, sd["conv2.weight"]))), 4)
    return F.linear(out.view(out.shape[0], -1), sd["linear.weight"], sd["linear.bias"])


# ---- layouts and parameter counts ----------------------------------------------------------------------
def test_dm_wrn28_10_has_robustbenchs_names_shapes_and_parameter_count():
    with torch.device("meta"):
        model = create_model("dm_wrn28_10_swish")
        big = create_model("dm_wrn70_16_swish")
        relu_wrn = create_model("wrn28_10")
    layout = _layout(model)
    assert layout[:17] == DM_WRN28_10_HEAD
    assert layout[-19:] == DM_WRN28_10_TAIL + DM_WRN28_10_LOGITS
    assert {k: s for k, s in layout if k.endswith("shortcut.weight")} == DM_WRN28_10_SHORTCUTS
    assert layout == rb_wrn_layout(28, 10)  # the whole list, 157 entries
    assert len(layout) == 157
    assert _nparams(model) == _wrn_count(28, 10) == 36_479_194  # = rpat's wrn28_10: same layers, other names
    assert _nparams(relu_wrn) == 36_479_194
    assert _layout(big) == rb_wrn_layout(70, 16)
    assert _nparams(big) == _wrn_count(70, 16) == 266_796_506


def test_dm_preact18_vgg16_mobilenetv2_have_the_published_names_shapes_and_counts():
    with torch.device("meta"):
        preact, vgg, mnv2 = (create_model(n) for n in ("dm_preact_resnet18_swish", "vgg16", "mobilenetv2"))
    p = _layout(preact)
    assert p[:len(DM_PREACT18_HEAD)] == DM_PREACT18_HEAD and p[-len(DM_PREACT18_TAIL):] == DM_PREACT18_TAIL
    assert {k: s for k, s in p if k.endswith("shortcut.weight")} == DM_PREACT18_SHORTCUTS
    assert p == rb_preact_layout()
    assert _nparams(preact) == _preact18_count() == 12_548_426
    v = _layout(vgg)
    assert v[:len(VGG16_HEAD)] == VGG16_HEAD and v[-len(VGG16_TAIL):] == VGG16_TAIL
    assert [k[: -len(".0.weight")] for k, s in v if len(s) == 4] == VGG16_CONVS
    assert _nparams(vgg) == _vgg16_count() == 8_173_130
    m = _layout(mnv2)
    assert m[:len(MOBILENETV2_HEAD)] == MOBILENETV2_HEAD and m[-len(MOBILENETV2_TAIL):] == MOBILENETV2_TAIL
    assert sum(k.endswith("conv3.weight") for k, _ in m) == 17  # 17 inverted residual blocks
    assert _nparams(mnv2) == _mobilenetv2_count() == 2_296_922


def test_registry_names_aliases_and_constructor_checks():
    for name in ("dm_wrn28_10_swish", "dm_wrn70_16_swish", "dm_preact_resnet18_swish", "vgg16", "mobilenetv2"):
        assert name in list_models()
    assert resolve_model_name("WRN-28-10-swish") == "dm_wrn28_10_swish"
    assert resolve_model_name("wrn-70-16-swish") == "dm_wrn70_16_swish"
    assert resolve_model_name("preact-resnet18-swish") == "dm_preact_resnet18_swish"
    assert resolve_model_name("MobileNet_V2") == "mobilenetv2" and resolve_model_name("VGG-16") == "vgg16"
    assert resolve_model_name("wrn-28-10") == "wrn28_10"  # the ReLU WRN keeps its name
    with pytest.raises(InputError, match="6n \\+ 4"):
        DMWideResNet(27, 1)
    with pytest.raises(InputError, match="depth must be one of"):
        DMPreActResNet(50)
    with pytest.raises(InputError, match="in_chans=1"):
        DMWideResNet(10, 1, in_chans=1, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    with pytest.raises(InputError, match="bn_momentum"):
        create_model("dm_preact_resnet18_swish", bn_momentum=0.0)
    with pytest.raises(InputError, match="std must be positive"):
        DMWideResNet(10, 1, mean=(0, 0, 0), std=(1, 0, 1))
    m = create_model("dm_preact_resnet18_swish", num_classes=7, in_chans=1, bn_momentum=0.01)
    assert m.mean.shape == (1, 1, 1) and float(m.mean) == 0.0 and float(m.std) == 1.0  # None: the identity
    assert m.batchnorm.momentum == 0.01 and m.logits.out_features == 7


# ---- the function computed -----------------------------------------------------------------------------
def test_same_pad_is_tensorflows_same_for_stride_2():
    # a 3x3 stride-2 conv whose kernel picks its centre: TF SAME on a 4x4 input pads 0 top/left, 1
    # bottom/right, so output[i, j] = x[2i + 1, 2j + 1]; symmetric padding 1 would give x[2i, 2j].
    x = torch.arange(16.0).view(1, 1, 4, 4)
    k = torch.zeros(1, 1, 3, 3)
    k[0, 0, 1, 1] = 1.0
    assert F.conv2d(same_pad(x, 2), k, stride=2).flatten().tolist() == [5.0, 7.0, 13.0, 15.0]
    assert F.conv2d(same_pad(x, 1), k).flatten().tolist() == x.flatten().tolist()
    with pytest.raises(InputError, match="stride 1 or 2"):
        same_pad(x, 3)


def test_a_robustbench_dm_wrn_state_dict_computes_robustbenchs_function():
    sd = _random_state(rb_wrn_layout(16, 2), seed=1)
    model = DMWideResNet(16, 2)  # buffers start as the identity; the checkpoint's statistics replace them
    load_weights(model, sd)
    model.eval()
    assert torch.equal(model.mean, sd["mean"]) and torch.equal(model.std, sd["std"])
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _ref_dm_wrn(sd, x, 16)
        out = model(x)
        proxies = model.forward_proxies(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert torch.equal(proxies["logits"], out)
    assert proxies["second_to_last"].shape == (3, 128) and proxies["third_to_last"].shape == (3, 64, 16, 16)
    torch.testing.assert_close(model.forward_head(proxies["second_to_last"]), out)
    # the statistics are part of the function: other ones give other logits
    sd2 = dict(sd, mean=torch.zeros(3, 1, 1), std=torch.ones(3, 1, 1))
    load_weights(model, sd2)
    with torch.no_grad():
        assert not torch.allclose(model(x), out, atol=1e-3)
        torch.testing.assert_close(model(x), _ref_dm_wrn(sd2, x, 16), rtol=1e-4, atol=1e-5)


def test_a_robustbench_dm_preact_state_dict_computes_robustbenchs_function():
    sd = _random_state(rb_preact_layout(), seed=3)
    model = create_model("dm_preact_resnet18_swish")
    load_weights(model, sd)
    model.eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _ref_dm_preact(sd, x), rtol=1e-4, atol=1e-5)
        p = model.forward_proxies(x)
    assert p["second_to_last"].shape == (2, 512) and p["third_to_last"].shape == (2, 256, 8, 8)


def test_vgg16_and_mobilenetv2_compute_the_releases_functions():
    vgg = create_model("vgg16")
    sd = _random_state(_layout(vgg), seed=5)
    load_weights(vgg, sd)
    vgg.eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(vgg(x), _ref_vgg16(sd, x), rtol=1e-4, atol=1e-5)
        p = vgg.forward_proxies(x)
    assert {k: tuple(v.shape) for k, v in p.items()} == {"logits": (2, 10), "second_to_last": (2, 512),
                                                         "third_to_last": (2, 512)}
    assert torch.equal(vgg.layer8(p["second_to_last"]), p["logits"])
    assert torch.equal(vgg.layer7(p["third_to_last"]), p["second_to_last"])
    mnv2 = create_model("mobilenetv2", num_classes=100, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    sd = _random_state(_layout(mnv2), seed=12)
    load_weights(mnv2, sd)
    mnv2.eval()
    with torch.no_grad():
        p = mnv2.forward_proxies(x)
        normed = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
        torch.testing.assert_close(p["logits"], _ref_mobilenetv2(sd, normed), rtol=1e-4, atol=1e-5)  # normalize inside
    assert {k: tuple(v.shape) for k, v in p.items()} == {"logits": (2, 100), "second_to_last": (2, 1280),
                                                         "third_to_last": (2, 320, 4, 4)}


# ---- loading and fine-tuning --------------------------------------------------------------------------
def test_infer_arch_recognizes_the_generated_data_checkpoints():
    with torch.device("meta"):
        wrn = {f"module.{k}": torch.empty(s) for k, s in rb_wrn_layout(28, 10)}  # DataParallel prefix
        c100 = {k: torch.empty(s) for k, s in rb_wrn_layout(70, 16, num_classes=100)}
        preact = {k: torch.empty(s) for k, s in rb_preact_layout()}
    assert infer_arch(wrn) == ["dm_wrn28_10_swish"]
    assert infer_arch(c100) == ["dm_wrn70_16_swish"]
    assert infer_arch(preact) == ["dm_preact_resnet18_swish"]
    no_stats = {k: v for k, v in preact.items() if k not in ("mean", "std")}
    assert infer_arch(no_stats) == []  # the statistics are part of the layout


def test_robustbench_checkpoint_file_loads_with_arch_and_fine_tunes(tmp_path):
    sd = _random_state(rb_preact_layout(), seed=7)
    path = tmp_path / "Rebuffi2021Fixing_R18_ddpm.pt"
    torch.save({"state_dict": OrderedDict((f"module.{k}", v) for k, v in sd.items())}, path)
    with pytest.warns(UserWarning, match="unverified"):
        model, _ = model_from_checkpoint(path, arch="dm_preact_resnet18_swish")
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _ref_dm_preact(sd, x), rtol=1e-4, atol=1e-5)
    with pytest.raises(InputError, match="already normalizes"):
        add_normalization(model, CIFAR10_MEAN, CIFAR10_STD)  # --normalize on top would normalize twice
    # fine-tuning: one SGD step moves the weights, never the statistics; the EMA keeps them exact
    model.train()
    wa = WeightAverage(model, decay=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    before = model.conv_2d.weight.detach().clone()
    loss = F.cross_entropy(model(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert model.conv_2d.weight.grad is not None and model.conv_2d.weight.grad.abs().sum() > 0
    assert model.mean.grad is None and not model.mean.requires_grad
    opt.step()
    wa.update(model, epoch=0)
    assert not torch.equal(model.conv_2d.weight, before)
    for m in (model, wa.model):
        assert torch.equal(m.mean, sd["mean"]) and torch.equal(m.std, sd["std"])
    assert [k for k, _ in model.state_dict().items()] == [k for k, _ in rb_preact_layout()]  # loads back in RB


def test_identity_statistics_accept_normalize_and_mean_std_fill_the_buffers():
    m = DMWideResNet(10, 1)
    add_normalization(m, CIFAR10_MEAN, CIFAR10_STD)  # no statistics inside yet: allowed (and applied first)
    x = torch.rand(2, 3, 32, 32)
    ref = DMWideResNet(10, 1, mean=CIFAR10_MEAN, std=CIFAR10_STD)
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k not in ("mean", "std")}, strict=False)
    m.eval()
    ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))
    assert ref.mean.flatten().tolist() == pytest.approx(list(CIFAR10_MEAN))


def test_rpat_eval_with_arch_on_a_robustbench_state_dict(tmp_path, cifar10_jpeg_subset):
    sd = _random_state(rb_preact_layout(), seed=9)
    path = tmp_path / "rb.pt"
    torch.save(sd, path)
    out = tmp_path / "r.json"
    code = main(["eval", str(path), "--arch", "dm_preact_resnet18_swish", "--dataset", "imagefolder",
                 "--data-root", str(cifar10_jpeg_subset), "--n-examples", "8", "--steps", "1",
                 "--autoattack", "none", "--no-sanity", "--no-progress", "--out", str(out)])
    assert code == 0
    report = json.loads(out.read_text())
    test = evaluation_subset("imagefolder", load_dataset("imagefolder", str(cifar10_jpeg_subset), "test"), 8)
    with torch.no_grad():
        pred = _ref_dm_preact(sd, test.images.float() / 255).argmax(1)
    expected = 100.0 * float((pred == test.labels).float().mean())
    assert report["arch"] == "dm_preact_resnet18_swish" and report["normalize"] is None  # the buffers normalize
    assert report["clean"] == pytest.approx(expected)


def test_dm_improves_at_files_need_their_statistics_added(tmp_path):
    # DM-Improves-AT's own weights-best.pt: {"model_state_dict": DataParallel(Sequential(net))} keys
    # ``module.0.*`` and no mean/std (its WideResNet keeps them as plain attributes, always CIFAR-10's)
    sd = _random_state(rb_preact_layout(), seed=10)
    own = {f"module.0.{k}": v for k, v in sd.items() if k not in ("mean", "std")}
    path = tmp_path / "weights-best.pt"
    torch.save({"model_state_dict": own, "unaveraged_model_state_dict": own}, path)
    with pytest.raises(InputError, match="missing key 'mean'.*lacks the input statistics.*docs/networks.md"):
        model_from_checkpoint(path, arch="dm_preact_resnet18_swish", log=lambda m: None)
    # the conversion docs/networks.md gives: strip module.0., add CIFAR-10's statistics
    ck = torch.load(path, map_location="cpu", weights_only=True)["model_state_dict"]
    fixed = {k.removeprefix("module.0."): v for k, v in ck.items()}
    fixed["mean"] = torch.tensor(CIFAR10_MEAN).view(3, 1, 1)
    fixed["std"] = torch.tensor(CIFAR10_STD).view(3, 1, 1)
    torch.save(fixed, tmp_path / "converted.pt")
    model, _ = model_from_checkpoint(tmp_path / "converted.pt", arch="dm_preact_resnet18_swish", log=lambda m: None)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _ref_dm_preact(sd, x), rtol=1e-4, atol=1e-5)
    # the loader also reads the module.0. keys directly once the statistics are there
    torch.save({"model_state_dict": {f"module.0.{k}": v for k, v in fixed.items()}}, tmp_path / "prefixed.pt")
    model2, _ = model_from_checkpoint(tmp_path / "prefixed.pt", arch="dm_preact_resnet18_swish", log=lambda m: None)
    with torch.no_grad():
        assert torch.equal(model2(x), model(x))


def test_a_full_size_robustbench_wrn28_10_file_loads_by_arch_name(tmp_path):
    sd = _random_state(rb_wrn_layout(28, 10), seed=13)
    path = tmp_path / "Wang2023Better_WRN-28-10.pt"
    torch.save(sd, path)
    model, _ = model_from_checkpoint(path, arch="dm_wrn28_10_swish", log=lambda m: None)
    assert model.arch == "dm_wrn28_10_swish" and not model.training
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(14))
    with torch.no_grad():
        torch.testing.assert_close(model(x), _ref_dm_wrn(sd, x, 28), rtol=1e-4, atol=1e-5)

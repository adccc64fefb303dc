"""Run configuration: nested dataclasses, YAML files, presets and ``key=value`` overrides.

A config is resolved in this order: defaults < preset < ``--config`` YAML file
< command-line overrides (``optim.lr=0.05 rpat.enabled=true``). The resolved
config is written to the run directory as ``config.yaml``.

Units: ε and step sizes are in pixel units of [0, 1] images and may be written
as ``8/255``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .attacks.ramp import ramped_threat
from .attacks.threat import NORMS, ThreatModel, default_threat, format_budget, parse_budget
from .data import DATASETS
from .data.cutmix import soft_label_refusal
from .data.extra import check_extra_config
from .errors import InputError
from .models import create_model, list_models, resolve_model_name
from .models.averaging import BN_MODES, check_averaging
from .objectives import BaseMethod, Objective, RPATTerm, TeacherTerm, build_objective, list_methods, method_label
from .objectives.losses import check_smoothing
from .objectives.registry import method_class
from .presets import check_preset_requirements, preset_dict


@dataclass
class DataConfig:
    dataset: str = "cifar10"  #: cifar10, cifar100, tiny-imagenet, imagefolder, digits
    root: str = "data"  #: folder holding the archive (or the image-folder tree)
    download: bool = False
    train_subset: int | None = None  #: use a fixed random subset of this many training images
    batch_size: int = 128
    augment: bool = True  #: random crop with zero padding + horizontal flip, on the device
    #: select ``best`` on this many training images held out of training (None: on the first
    #: eval.n_examples test images); the split is fixed by ``val_seed`` and never overlaps training
    val_size: int | None = None
    val_seed: int = 0
    #: extra (generated) training images: an .npz with 'image' (uint8 N x H x W x C) and 'label' (N ints), or
    #: a directory of NAME_image.npy / NAME_label.npy shards; memory-mapped, never read whole (docs/extra_data.md)
    extra: str | None = None
    #: share of each batch drawn from data.extra (round(f·B) rows); an epoch stays as many batches as the
    #: real set needs at data.batch_size (ceil(N_real / B)), as in the published generated-data recipes
    extra_fraction: float = 0.7
    #: label smoothing of the extra rows only, in [0, 1) (the real rows keep method.label_smoothing)
    extra_label_smoothing: float = 0.0
    #: AutoAugment's CIFAR-10 policy after crop/flip, batched on the device (docs/augmentation.md)
    autoaugment: bool = False
    autoaugment_start_epoch: int = 0  #: first 0-based epoch with AutoAugment on (the release's autoaug_sche)
    #: side (px) of the Cutout box after AutoAugment (None: half the image side, the release's autoaug; 0: no Cutout)
    autoaugment_cutout: int | None = None
    cutmix: bool = False  #: CutMix (box area ~ Beta(1, 1)); labels become (B, K) probabilities mixed by area


@dataclass
class ModelConfig:
    arch: str = "resnet18"
    normalize: bool = False  #: add a per-channel normalization layer (dataset mean/std) inside the model
    #: start from these weights (fine-tuning): an rpat checkpoint (its evaluated model) or a plain /
    #: RobustBench state_dict of model.arch, loaded strictly (keys and shapes checked); not used on --resume
    init: str | None = None


@dataclass
class AttackConfig:
    """The training threat model (PGD-10 by default).

    ``eps``/``step_size`` left empty take the paper's values for ``norm``
    (``rpat.attacks.threat.default_threat``): linf 8/255 step 2/255, l2 128/255 step 32/255.
    """

    norm: str = "linf"
    eps: str | float | None = None
    step_size: str | float | None = None
    steps: int = 10
    #: ReBAT's "$": from the first lr milestone on, train against the stronger adversary below
    #: (evaluation keeps the budget above)
    strong_after_decay: bool = False
    strong_eps: str | float = "10/255"
    strong_step_size: str | float | None = None  #: default: the step size above
    strong_steps: int = 12
    #: ε and the step size grow linearly to their targets over the first N epochs (0: off), constant
    #: within an epoch: (e + 1)/N of the target in 0-based epoch e (rpat.attacks.ramp)
    eps_ramp_epochs: int = 0


@dataclass
class MethodConfig:
    name: str = "pgd_at"
    #: MART only: the paper's exact log(1 − p) and (1 − p_true) instead of the official code's constants
    #: log(1.0001 − p + 1e-12) and (1.0000001 − p_true) (rpat.objectives.mart)
    mart_exact: bool = False
    #: label smoothing s in [0, 1) of every cross-entropy term of the training loss (not the attacks, not
    #: evaluation): target (1 − s)·onehot + s/K (rpat.objectives.losses)
    label_smoothing: float = 0.0
    #: TRADES only: β, the weight of the KL term (None: TRADES' published 6.0; the generated-data recipe uses 5)
    trades_beta: float | None = None


@dataclass
class RPATConfig:
    enabled: bool = False
    lam: float = 1.0  #: λ, weight of the regularizer
    alpha: float = 0.5  #: a, interpolation rate: x_mid = x + a·(x_adv − x)
    proxy: str = "logits"  #: logits, second_to_last, third_to_last
    start_epoch: int = 0  #: first 0-based epoch with the term on


@dataclass
class AveragingConfig:
    """Weight averaging (EMA of parameters and BatchNorm buffers); when on, the WA model is evaluated."""

    enabled: bool = False
    decay: float = 0.999
    start_epoch: int = 0  #: first 0-based epoch of the EMA; before it the WA model copies the online one
    warmup: bool = False  #: decay min(decay, (1 + t)/(10 + t)) at the t-th EMA step (the generated-data recipes)
    #: the averaged model's BatchNorm statistics (all buffers): average (EMA, like the weights) or copy
    #: (the online model's, as DeepMind's and DM-Improves-AT's code) (rpat.models.averaging)
    bn: str = "average"


@dataclass
class ReBATConfig:
    """ReBAT's BoAT term ``β·KL(f_wa(x_adv) ‖ f(x_adv))``, or RPAT++'s (target robust_perception)."""

    enabled: bool = False  #: needs averaging.enabled
    beta: float = 1.0
    target: str = "adversarial"  #: adversarial (ReBAT) or robust_perception (RPAT++)
    alpha: float = 0.5  #: a of the RPAT++ target softmax(h_wa(x+aΔ) − (1−a)·h_wa(x)) vs softmax(a·h(x+Δ))
    start_epoch: int | None = None  #: first 0-based epoch with the term on (default averaging.start_epoch)
    beta_growth: float = 1.0  #: β × beta_growth at each lr milestone (1: constant β)


#: AWP's published defaults per method (csdongxian/AWP): (γ, warm-up epochs) for AT-AWP
#: (``AT_AWP/train_cifar10.py``: --awp-gamma 0.01, --awp-warmup 0) and TRADES-AWP
#: (``trades_AWP/train_trades_cifar.py``: --awp-gamma 0.005, --awp-warmup 10, with epochs counted from 1, so
#: AWP from its 10th epoch: rpat's 0-based warm-up 9); other methods set awp.gamma
AWP_DEFAULTS: dict[str, tuple[float, int]] = {"pgd_at": (0.01, 0), "trades": (5e-3, 9)}
AWP_LOSSES = ("base", "full")


@dataclass
class AWPConfig:
    """Adversarial weight perturbation (Wu et al., NeurIPS 2020; ``rpat.training.awp``, ``docs/awp.md``)."""

    enabled: bool = False
    gamma: float | None = None  #: γ, relative size of the weight perturbation (None: the method's published value)
    warmup_epochs: int | None = None  #: 0-based epochs without AWP first (None: the method's published value)
    proxy_lr: float = 0.01  #: lr of the proxy's one plain SGD ascent step
    loss: str = "base"  #: what the proxy ascends: base (the method's loss) or full (+ RPAT and teacher terms)


@dataclass
class OptimConfig:
    epochs: int = 110
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    schedule: str = "piecewise"  #: piecewise (lr × gamma at each milestone epoch), cosine, constant
    milestones: list[int] = field(default_factory=lambda: [100, 105])
    gamma: float = 0.1
    warmup_epochs: int = 0  #: linear lr warm-up from 0 over the first N epochs (per step), then the schedule
    #: none, or linear: the lr is optim.lr·batch_size/256 (optim.lr is the lr at batch 256; rpat.training.schedules)
    lr_scaling: str = "none"


@dataclass
class EvalConfig:
    """Held-out PGD accuracy after each epoch (selects the ``best`` checkpoint)."""

    n_examples: int = 1000  #: first N test images
    eps: str | float | None = None  #: default: the training ε
    step_size: str | float | None = None  #: default: the training step size
    steps: int = 20
    batch_size: int = 500


AMP_MODES = ("none", "bf16")


@dataclass
class SpeedConfig:
    """Speed options of the training step (evaluation and AutoAttack always run in fp32).

    See ``benchmarks/README.md`` for what each one measured.
    """

    amp: str = "none"  #: none (fp32) or bf16: autocast of the attack and the loss, fp32 master weights
    channels_last: bool = False  #: NHWC memory format for the model and the batches
    compile: bool = False  #: torch.compile the training model (not the evaluation)
    sync_bn: bool = False  #: under torchrun (several processes): BatchNorm -> SyncBatchNorm
    #: capture the whole training step (attack, loss, backward, SGD, WA, guard, loss sums) as one CUDA
    #: graph and replay it per full batch (rpat.training.cuda_graph); true needs one CUDA GPU (no DDP,
    #: no compile); "eager" runs the same bookkeeping without capture on any device (for tests)
    cuda_graph: bool | str = False


TENSORBOARD_MISSING = ("logging.tensorboard=true needs the tensorboard package, which is not installed: "
                       "pip install 'rpat[tensorboard]' (or set logging.tensorboard=false)")


@dataclass
class LoggingConfig:
    """Where training logs go besides metrics.jsonl (``rpat.training.tensorboard``, ``docs/logging.md``)."""

    tensorboard: bool = False  #: also write TensorBoard event files to <run_dir>/tb/ (needs rpat[tensorboard])


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    rpat: RPATConfig = field(default_factory=RPATConfig)
    averaging: AveragingConfig = field(default_factory=AveragingConfig)
    rebat: ReBATConfig = field(default_factory=ReBATConfig)
    awp: AWPConfig = field(default_factory=AWPConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    device: str = "auto"  #: auto (cuda if available), cpu, cuda, cuda:1, ...
    log_interval: int = 20  #: steps between progress-bar loss updates (one host sync each)
    save_every: int = 0  #: also keep ``epochs/epoch_NNNN.pt`` every N epochs (0: never), for analyses
    #: non-finite loss/gradient: stop (message names the step and the term) or skip the batch exactly;
    #: detected on the device and read once per log_interval (rpat.training.nonfinite)
    nonfinite: str = "stop"

    # ---- derived objects -------------------------------------------------------------
    def train_threat(self) -> ThreatModel:
        a = self.attack
        base = default_threat(a.norm, a.steps) if a.norm in NORMS else None
        if base is None:
            raise InputError(f"unknown attack.norm {a.norm!r}; valid: {', '.join(NORMS)}")
        eps = base.eps if a.eps is None else _budget(a.eps, "attack.eps", a.norm)
        step = base.step_size if a.step_size is None else _budget(a.step_size, "attack.step_size", a.norm)
        return ThreatModel(a.norm, eps, step, a.steps)

    def train_threat_at(self, epoch: int) -> ThreatModel:
        """The training threat of 0-based ``epoch``: with ``attack.strong_after_decay``, from the
        first lr milestone on, ε = strong_eps and strong_steps steps; else ``train_threat()``; during
        ``attack.eps_ramp_epochs`` its ε and step size × (epoch + 1)/N (``rpat.attacks.ramp``)."""
        t = self.train_threat()
        a = self.attack
        if not a.strong_after_decay or epoch < self.strong_attack_epoch():
            return ramped_threat(t, epoch, a.eps_ramp_epochs)
        step = t.step_size if a.strong_step_size is None else parse_budget(a.strong_step_size,
                                                                            "attack.strong_step_size")
        strong = ThreatModel(t.norm, parse_budget(a.strong_eps, "attack.strong_eps"), step, a.strong_steps)
        return ramped_threat(strong, epoch, a.eps_ramp_epochs)

    def strong_attack_epoch(self) -> int:
        """First 0-based epoch of the stronger training adversary: the first lr milestone."""
        if self.optim.schedule != "piecewise" or not self.optim.milestones:
            raise InputError("attack.strong_after_decay needs optim.schedule=piecewise with optim.milestones")
        return int(self.optim.milestones[0])

    def rpat_term(self) -> RPATTerm | None:
        """The RPAT term of ``rpat`` (None when off)."""
        r = self.rpat
        return RPATTerm(r.lam, r.alpha, r.proxy, r.start_epoch) if r.enabled else None

    def teacher_term(self) -> TeacherTerm | None:
        """The ReBAT / RPAT++ term of ``rebat`` (None when off); its teacher is bound by the trainer."""
        r = self.rebat
        if not r.enabled:
            return None
        start = self.averaging.start_epoch if r.start_epoch is None else r.start_epoch
        milestones = tuple(self.optim.milestones) if self.optim.schedule == "piecewise" else ()
        return TeacherTerm(r.beta, start, r.target, r.alpha, r.beta_growth, milestones)

    def awp_settings(self) -> tuple[float, int]:
        """AWP's ``(γ, warm-up epochs)`` for this method: ``awp.gamma`` / ``awp.warmup_epochs``, or where left
        empty the method's published values (``AWP_DEFAULTS``; warm-up 0 for a method without them)."""
        w = self.awp
        gamma, warmup = AWP_DEFAULTS.get(self.method.name, (None, 0))
        gamma = gamma if w.gamma is None else w.gamma
        if gamma is None:
            raise InputError(f"awp.gamma has no published default for method.name={self.method.name}: set it, e.g. "
                             "awp.gamma=0.01 (AT-AWP's value) or awp.gamma=0.005 (TRADES-AWP's)")
        return float(gamma), int(warmup if w.warmup_epochs is None else w.warmup_epochs)

    def objective(self) -> Objective:
        """The training objective of this config (base method at the epoch-0 threat, RPAT, teacher term):
        the one place a config becomes terms (the trainer, the CUDA-graph key and validation use it)."""
        return build_objective(self.method.name, self.train_threat(), self.rpat_term(), self.teacher_term(),
                               **self.method_options())

    def label(self) -> str:
        """The run's method label, as every table prints it (``rpat.objectives.method_label``)."""
        return method_label(self.method.name, self.rpat.enabled, self.rpat.proxy,
                            self.rebat.target if self.rebat.enabled else None) + (" + AWP" if self.awp.enabled else "")

    def method_options(self) -> dict[str, Any]:
        """Keyword options of the base method's constructor (``build_objective(..., **options)``)."""
        options: dict[str, Any] = {"exact": self.method.mart_exact} if self.method.name == "mart" else {}
        if self.method.label_smoothing:
            options["label_smoothing"] = self.method.label_smoothing
        if self.method.trades_beta is not None:
            options["beta"] = float(self.method.trades_beta)
        return options

    def eval_threat(self) -> ThreatModel:
        t = self.train_threat()
        e = self.eval
        eps = t.eps if e.eps is None else _budget(e.eps, "eval.eps", t.norm)
        step = t.step_size if e.step_size is None else _budget(e.step_size, "eval.step_size", t.norm)
        return ThreatModel(t.norm, eps, step, e.steps)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Check ranges and names; raises InputError with one clear line."""
        if self.data.dataset not in DATASETS:
            raise InputError(f"unknown dataset {self.data.dataset!r}; valid: {', '.join(sorted(DATASETS))}")
        if self.model.arch not in list_models():
            create_model(self.model.arch)  # raises the canonical unknown-model error, or resolves an alias
            self.model.arch = resolve_model_name(self.model.arch)  # stored and printed by its canonical name
        if self.method.name not in list_methods():
            raise InputError(f"unknown method {self.method.name!r}; valid: {', '.join(list_methods())}")
        if self.method.mart_exact and self.method.name != "mart":
            raise InputError(f"method.mart_exact applies to method.name=mart only, not {self.method.name!r}")
        for where, threat in (("attack", self.train_threat()), ("eval", self.eval_threat())):
            for name in ("eps", "step_size"):
                if not getattr(threat, name) > 0:
                    raise InputError(f"{where}.{name} must be > 0 (pixel units, e.g. 8/255), got 0")
        _positive_int(self.data.batch_size, "data.batch_size")
        _positive_int(self.optim.epochs, "optim.epochs")
        _positive_int(self.eval.n_examples, "eval.n_examples")
        _positive_int(self.eval.batch_size, "eval.batch_size")
        _positive_int(self.log_interval, "log_interval")
        if not isinstance(self.save_every, int) or isinstance(self.save_every, bool) or self.save_every < 0:
            raise InputError(f"save_every must be an integer >= 0, got {self.save_every!r}")
        if self.nonfinite not in ("stop", "skip"):
            raise InputError(f"nonfinite must be stop or skip, got {self.nonfinite!r}")
        if self.data.train_subset is not None:
            _positive_int(self.data.train_subset, "data.train_subset")
        for name in ("lr", "momentum", "weight_decay", "gamma"):
            v = getattr(self.optim, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not 0 <= v < float("inf"):
                raise InputError(f"optim.{name} must be a finite number >= 0, got {v!r}")
        if not self.optim.lr > 0:
            raise InputError(f"optim.lr must be > 0, got {self.optim.lr!r}")
        if self.optim.schedule not in SCHEDULES:
            raise InputError(f"unknown optim.schedule {self.optim.schedule!r}; valid: {', '.join(SCHEDULES)}")
        if sorted(self.optim.milestones) != list(self.optim.milestones):
            raise InputError(f"optim.milestones must be increasing, got {self.optim.milestones}")
        r = self.rpat
        if not isinstance(r.alpha, (int, float)) or isinstance(r.alpha, bool):
            raise InputError(f"rpat.alpha must be a number in [0, 1], got {r.alpha!r}")
        RPATTerm(r.lam, r.alpha, r.proxy, r.start_epoch)  # checked even when off, so a typo fails before training
        self._validate_rebat()
        self._validate_extra()
        self._validate_augment()
        self._validate_awp()
        self._validate_recipes()
        self._validate_trades_beta()
        if self.model.init is not None and not Path(self.model.init).is_file():
            raise InputError(f"model.init={self.model.init}: no such file (the weights to start training from)")
        self._validate_logging()
        if self.speed.amp not in AMP_MODES:
            raise InputError(f"unknown speed.amp {self.speed.amp!r}; valid: {', '.join(AMP_MODES)}")
        if not (isinstance(self.speed.cuda_graph, bool) or self.speed.cuda_graph == "eager"):
            raise InputError(f"speed.cuda_graph must be true, false or eager, got {self.speed.cuda_graph!r}")
        if self.speed.cuda_graph and self.speed.compile:
            raise InputError("speed.cuda_graph and speed.compile exclude each other: pick one")
        return self

    def _validate_extra(self) -> None:
        """Checks for the extra (generated) data: fraction, smoothing, and the file's headers and labels."""
        d = self.data
        check_extra_config(d.extra, d.extra_fraction, d.extra_label_smoothing, d.batch_size, DATASETS[d.dataset])

    def _validate_augment(self) -> None:
        """AutoAugment and CutMix (``data.autoaugment*``, ``data.cutmix``; docs/augmentation.md), before any data."""
        d = self.data
        for name in ("autoaugment_start_epoch", "autoaugment_cutout"):
            v = getattr(d, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise InputError(f"data.{name} must be an integer >= 0, got {v!r}")
        if d.autoaugment and d.autoaugment_start_epoch >= self.optim.epochs:
            raise InputError(f"data.autoaugment_start_epoch={d.autoaugment_start_epoch} (0-based) is not before the "
                             f"end of training (optim.epochs={self.optim.epochs}): AutoAugment would never run; "
                             "lower it")
        why = soft_label_refusal(self.method.name) if d.cutmix else None
        if why is not None:
            raise InputError(f"data.cutmix trains on soft (B, K) labels, which method.name={self.method.name} cannot "
                             f"use ({why}): use method.name=pgd_at or trades, or set data.cutmix=false")

    def _validate_rebat(self) -> None:
        """Checks for weight averaging, the ReBAT / RPAT++ term, the strong adversary and val_size."""
        if self.data.val_size is not None:
            _positive_int(self.data.val_size, "data.val_size")
        if self.attack.strong_after_decay:
            _positive_int(self.attack.strong_steps, "attack.strong_steps")
            self.train_threat_at(self.strong_attack_epoch())
        check_averaging(self.averaging.decay, self.averaging.start_epoch)
        if self.rebat.enabled and not self.averaging.enabled:
            raise InputError("rebat.enabled needs the weight-averaged teacher: set averaging.enabled=true")
        r = self.rebat  # checked even when off, so a typo fails before training starts
        TeacherTerm(r.beta, 0 if r.start_epoch is None else r.start_epoch, r.target, r.alpha, r.beta_growth)

    def _validate_awp(self) -> None:
        """Checks for adversarial weight perturbation (``awp.*``), at config time, before data is read."""
        w = self.awp
        if w.loss not in AWP_LOSSES:
            raise InputError(f"unknown awp.loss {w.loss!r}; valid: {', '.join(AWP_LOSSES)}")
        for name in ("gamma", "proxy_lr"):
            v = getattr(w, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf")):
                raise InputError(f"awp.{name} must be a finite number >= 0, got {v!r}")
        if not w.proxy_lr > 0:
            raise InputError(f"awp.proxy_lr must be > 0 (the proxy's ascent step), got {w.proxy_lr!r}")
        if w.warmup_epochs is not None and w.warmup_epochs < 0:
            raise InputError(f"awp.warmup_epochs must be an integer >= 0, got {w.warmup_epochs!r}")
        if not w.enabled:
            return
        if method_class(self.method.name).loss is BaseMethod.loss:
            raise InputError(f"awp.enabled needs a method with a loss to ascend; method.name={self.method.name} has "
                             "none: set awp.enabled=false")
        _, warmup = self.awp_settings()
        if warmup >= self.optim.epochs:
            raise InputError(f"awp.warmup_epochs={warmup} is not shorter than training (optim.epochs="
                             f"{self.optim.epochs}): AWP would never run; lower awp.warmup_epochs")
        if self.speed.cuda_graph:
            raise InputError("awp.enabled does not run under speed.cuda_graph (the proxy step is not captured): "
                             "set speed.cuda_graph=false")

    def _validate_logging(self) -> None:
        """``logging.tensorboard=true`` needs the tensorboard package: checked here, before any data is read."""
        if self.logging.tensorboard and importlib.util.find_spec("tensorboard") is None:
            raise InputError(TENSORBOARD_MISSING)

    def _validate_trades_beta(self) -> None:
        """``method.trades_beta``: a finite number >= 0, and only with method.name=trades."""
        b = self.method.trades_beta
        if b is None:
            return
        if isinstance(b, bool) or not isinstance(b, (int, float)) or not 0 <= b < float("inf"):
            raise InputError(f"method.trades_beta must be a finite number >= 0 (TRADES' β, e.g. 6), got {b!r}")
        if self.method.name != "trades":
            raise InputError(f"method.trades_beta applies to method.name=trades only, not {self.method.name!r}; "
                             "drop method.trades_beta")

    def _validate_recipes(self) -> None:
        """Checks for label smoothing, the EMA warm-up / BN mode, the lr warm-up and scaling and the ε ramp."""
        check_smoothing(self.method.label_smoothing)
        if self.averaging.bn not in BN_MODES:
            raise InputError(f"unknown averaging.bn {self.averaging.bn!r}; valid: {', '.join(BN_MODES)}")
        o, ramp = self.optim, self.attack.eps_ramp_epochs
        if o.lr_scaling not in LR_SCALINGS:
            raise InputError(f"unknown optim.lr_scaling {o.lr_scaling!r}; valid: {', '.join(LR_SCALINGS)}")
        for name, v in (("optim.warmup_epochs", o.warmup_epochs), ("attack.eps_ramp_epochs", ramp)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise InputError(f"{name} must be an integer >= 0, got {v!r}")
        if o.warmup_epochs and o.warmup_epochs >= o.epochs:
            raise InputError(f"optim.warmup_epochs={o.warmup_epochs} is not shorter than training (optim.epochs="
                             f"{o.epochs}): the lr would never reach optim.lr; lower optim.warmup_epochs")
        if ramp > o.epochs:
            raise InputError(f"attack.eps_ramp_epochs={ramp} is longer than training (optim.epochs={o.epochs}): "
                             f"the training ε would never reach its target; set it <= {o.epochs}")

    def warnings(self) -> list[str]:
        """Settings that are legal but probably not meant (printed as ``rpat: warning: ...`` at start)."""
        out = []
        for where, t in (("attack", self.train_threat()), ("eval", self.eval_threat())):
            if t.step_size > t.eps:
                out.append(f"{where}.step_size={format_budget(t.step_size)} is larger than {where}.eps="
                           f"{format_budget(t.eps)}: every step overshoots the ball and is projected back")
        o = self.optim
        late = [m for m in o.milestones if m >= o.epochs]
        if o.schedule == "piecewise" and late:
            out.append(f"optim.milestones {late} are at or beyond the last epoch ({o.epochs} epochs): the learning "
                       f"rate never decays there; scale them (e.g. --epochs N rescales them) or set optim.milestones")
        return out

    def with_epochs(self, epochs: int) -> tuple[Config, str | None]:
        """This config trained for ``epochs`` epochs, with a piecewise schedule's milestones rescaled in
        proportion (as the paper's 100/110 and 105/110): ``m -> floor(m·epochs/old)``, capped at the last
        epoch. Returns the new config and a line saying what changed (None when nothing was rescaled)."""
        cfg = config_from_dict(self.to_dict())
        old = cfg.optim.epochs
        cfg.optim.epochs = epochs
        o = cfg.optim
        if o.schedule != "piecewise" or not o.milestones or epochs == old:
            return cfg.validate(), None
        new = [min(m * epochs // old, epochs - 1) for m in o.milestones]
        note = (f"--epochs {epochs}: lr milestones {o.milestones} of {old} epochs rescaled to {new} (the same "
                f"fractions of the run; set optim.milestones to choose them)")
        o.milestones = new
        return cfg.validate(), note

    def resolved_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` with the budgets left empty filled in (``attack.eps: 8/255``...): what config.yaml holds."""
        d = self.to_dict()
        t, e = self.train_threat(), self.eval_threat()
        d["attack"].update(eps=format_budget(t.eps), step_size=format_budget(t.step_size))
        d["eval"].update(eps=format_budget(e.eps), step_size=format_budget(e.step_size))
        a = self.attack
        if a.strong_step_size is None:
            d["attack"]["strong_step_size"] = format_budget(t.step_size)
        return d

    def describe(self) -> str:
        t = self.train_threat()
        method = self.label()
        if self.averaging.enabled:
            method += f" | WA from epoch {self.averaging.start_epoch + 1}"
        if self.awp.enabled:
            gamma, warmup = self.awp_settings()
            method += f" | AWP gamma={gamma:g} from epoch {warmup + 1} (proxy ascends the {self.awp.loss} loss)"
        if self.attack.strong_after_decay:
            strong = format_budget(parse_budget(self.attack.strong_eps))
            method += f" | ${strong} from epoch {self.strong_attack_epoch() + 1}"
        if self.data.autoaugment:  # docs/augmentation.md
            method += f" | AutoAugment from epoch {self.data.autoaugment_start_epoch + 1}"
        if self.data.cutmix:
            method += " | CutMix"
        sched = self.optim.schedule + (f", lr x{self.optim.gamma} at {self.optim.milestones}"
                                       if self.optim.schedule == "piecewise" else "")
        sched += self._describe_recipes()
        return (f"{method} | {self.model.arch} on {self.data.dataset} | training attack {t.describe()} | "
                f"{self.optim.epochs} epochs ({sched})")

    def _describe_recipes(self) -> str:
        """The banner's words for label smoothing, the EMA warm-up / BN mode, the lr warm-up and scaling, the ε ramp."""
        o, a, w = self.optim, self.attack, self.averaging
        parts = [f"lr warm-up {o.warmup_epochs} epochs" if o.warmup_epochs else "",
                 f"lr x {self.data.batch_size}/256 (linear scaling)" if o.lr_scaling == "linear" else "",
                 f"eps ramp {a.eps_ramp_epochs} epochs" if a.eps_ramp_epochs else "",
                 f"label smoothing {self.method.label_smoothing:g}" if self.method.label_smoothing else "",
                 "EMA warm-up" if w.enabled and w.warmup else "",
                 "WA BN stats copied" if w.enabled and w.bn == "copy" else ""]
        return "".join(f", {p}" for p in parts if p)


SCHEDULES = ("piecewise", "cosine", "constant")
LR_SCALINGS = ("none", "linear")  #: optim.lr_scaling: none, or lr = optim.lr·batch_size/256


def _budget(value: str | float, name: str, norm: str) -> float:
    """A budget in pixel units; under ℓ∞ a value above 1 (``2`` meant as ``2/255``) is refused, naming the key."""
    v = parse_budget(value, name)
    if norm == "linf" and v > 1:
        raise InputError(f"{name}={value} is above 1, but images are in [0, 1] (ℓ∞ budgets are pixel units); "
                         f"did you mean {value}/255? ({name}={value}/255)")
    return v


def _positive_int(v: Any, name: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InputError(f"{name} must be an integer >= 1, got {v!r}")


# ---- building from dicts -------------------------------------------------------------
def _merge(obj: Any, values: dict[str, Any], where: str) -> None:
    if not isinstance(values, dict):
        raise InputError(f"{where or 'config'} must be a mapping, got {values!r}")
    names = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in values.items():
        if not isinstance(key, str) or key not in names:
            valid = ", ".join(names)
            raise InputError(f"unknown config key {where + str(key)!r}; valid keys here: {valid}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{where}{key}.")
        else:
            setattr(obj, key, _coerce(value, current, names[key], where + key))


def _coerce(value: Any, current: Any, fld: dataclasses.Field, name: str) -> Any:
    """Light type checking: ints stay ints, floats accept ints, bools must be bools."""
    typ = str(fld.type)
    if value is None:
        if "None" in typ:
            return None
        raise InputError(f"{name} cannot be empty")
    if typ == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{name} must be true or false, got {value!r}")
        return value
    if typ == "int" or typ == "int | None":
        if not isinstance(value, int) or isinstance(value, bool):
            raise InputError(f"{name} must be an integer, got {value!r}")
        return value
    if typ == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{name} must be a number, got {value!r}")
        return float(value)
    if typ == "str":
        return str(value)
    if typ.startswith("list"):
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, int) for v in value):
            raise InputError(f"{name} must be a list of integers, got {value!r}")
        return value
    if typ == "bool | str":
        if not isinstance(value, bool) and value != "eager":
            raise InputError(f"{name} must be true, false or eager, got {value!r}")
        return value
    if "str | float" in typ:
        if isinstance(value, bool):
            raise InputError(f"{name} must be a number such as 8/255, got {value!r}")
        parse_budget(value, name)
        return value
    return value


def override_keys_help(width: int = 112) -> str:
    """Every config key, as ``rpat train --help`` lists them: ``section.{key,key,...}`` per section, then the
    top-level keys, wrapped at ``width`` (made from the dataclasses, so a new key is listed by itself)."""
    items = []
    for f in dataclasses.fields(Config):
        value = getattr(Config(), f.name)
        if dataclasses.is_dataclass(value):
            items.append(f"{f.name}.{{{','.join(g.name for g in dataclasses.fields(value))}}}")
        else:
            items.append(f.name)
    lines, line = [], ""
    for item in items:
        if line and len(line) + 2 + len(item) > width:
            lines.append(line)
            line = ""
        while len(item) + 2 > width:  # one section longer than a line: break it after a comma
            cut = item.rindex(",", 0, width - 2) + 1
            lines.append(f"  {item[:cut]}")
            item = "    " + item[cut:]
        line = f"{line}  {item}" if line else (f"  {item}" if not item.startswith(" ") else item)
    return "\n".join([*lines, line])


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise InputError(f"config file {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise InputError(f"config file {str(p)!r} is not valid YAML: {first}") from None
    return data or {}


def parse_override(text: str) -> dict[str, Any]:
    """``"optim.lr=0.05"`` -> ``{"optim": {"lr": 0.05}}`` (value parsed as YAML)."""
    if "=" not in text:
        raise InputError(f"override {text!r} must look like section.key=value (e.g. optim.lr=0.05)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise InputError(f"override {text!r} has no key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and "/" in value:
        value = value.strip()
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return out


def build_config(
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: list[str] | list[dict[str, Any]] | None = None,
) -> Config:
    """Resolve defaults < preset < file < overrides, validate, and return the Config."""
    cfg = Config()
    if preset:
        _merge(cfg, preset_dict(preset), "")
    if file:
        _merge(cfg, load_yaml(file), "")
    for o in overrides or []:
        _merge(cfg, parse_override(o) if isinstance(o, str) else o, "")
    check_preset_requirements(preset, cfg.to_dict())  # e.g. data.extra for the generated-data presets
    return cfg.validate()


def config_from_dict(values: dict[str, Any]) -> Config:
    """Rebuild a Config from ``Config.to_dict()`` output (e.g. stored in a checkpoint)."""
    cfg = Config()
    _merge(cfg, values, "")
    return cfg


def dump_yaml(cfg: Config) -> str:
    """The config as YAML, with the budgets resolved (:meth:`Config.resolved_dict`)."""
    return yaml.safe_dump(cfg.resolved_dict(), sort_keys=False)

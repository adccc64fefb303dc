"""The trainer: one loop for every method (base objective + optional RPAT term).

Run directory layout::

    config.yaml     the resolved config
    meta.json       rpat version, git commit, torch version, device, start time
    metrics.jsonl   one JSON object per finished epoch
    last.pt         model + optimizer + progress, rewritten atomically after each epoch
    best.pt         weights with the highest held-out PGD accuracy so far
    final.pt        weights after the last epoch
                    (with ``averaging.enabled`` best/final/epochs hold the weight-averaged
                    model, the one evaluated; last.pt keeps the online model and ``averaged``)
    epochs/         epoch_NNNN.pt every ``save_every`` epochs (when set), for the analyses

Determinism: every random draw of epoch ``e`` (batch order, augmentation,
attack starts) comes from generators seeded by ``(seed, e)`` alone, and the
learning rate is a pure function of ``(e, step)``. Restoring the model and the
optimizer at an epoch boundary therefore continues the run exactly as if it
had never stopped (bit for bit on CPU).
"""

from __future__ import annotations

import json
import math
import platform
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import FORMAT, FORMAT_VERSION, atomic_save, load_checkpoint
from ..config import Config, config_from_dict, dump_yaml
from ..data import PARTIAL_DECODE, ArrayDataset, DeviceLoader, count_images, evaluation_subset, get_spec, load_dataset
from ..distributed import (
    all_reduce_sum,
    context_from_env,
    convert_sync_batchnorm,
    per_rank_batch_size,
    setup,
    wrap_model,
)
from ..errors import InputError
from ..evaluation.robustness import accuracy, pgd_accuracy
from ..models import create_model
from ..models.averaging import WeightAverage
from ..objectives import RPATTerm, build_objective
from ..utils import derived_seed, git_commit, make_generator, progress_enabled, resolve_device
from .cuda_graph import GraphTrainStep, phase_key
from .nonfinite import NonFiniteGuard, NonFiniteLossError
from .schedules import lr_at

RUN_FILES = ("config.yaml", "meta.json", "metrics.jsonl", "last.pt", "best.pt", "final.pt")


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped :meth:`Trainer.fit`; ``last.pt`` holds the last finished epoch.

    The unfinished epoch is discarded, so ``--resume`` continues bit for bit like
    an uninterrupted run. ``exit_code`` is 128 + the signal number (130, 143).
    """

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = int(signum)
        self.message = message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message or f"interrupted by {signal.Signals(self.signum).name}"


@dataclass
class RunData:
    """The data a run trains and selects on (uint8 images, CPU)."""

    train: ArrayDataset
    held_out: ArrayDataset
    num_classes: int
    in_chans: int
    padding: int
    flip: bool
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    selection: str = "test"  #: where held_out comes from: "test" or "validation" (carved from train)


def split_validation(train: ArrayDataset, n: int, seed: int) -> tuple[ArrayDataset, ArrayDataset]:
    """``(rest, val)``: ``n`` images drawn by ``seed`` become the validation set, the rest (in their
    original order) stay for training; the two never share an image index."""
    rest, val = _validation_indices(len(train), n, seed)
    return train.subset(rest), train.subset(val)


def _validation_indices(n_total: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n >= n_total:
        raise InputError(f"data.val_size={n} leaves no training images (the training set has {n_total})")
    g = torch.Generator().manual_seed(derived_seed(seed, 29))
    perm = torch.randperm(n_total, generator=g)
    return perm[n:].sort().values, perm[:n].sort().values


def train_indices(cfg: Config, n_total: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Positions in the full training split of the images trained on and of the validation split
    (``data.val_size``; None without one), after ``data.train_subset``; both sorted."""
    d = cfg.data
    idx, val = torch.arange(n_total), None
    if d.val_size is not None:
        idx, val = _validation_indices(n_total, d.val_size, d.val_seed)
    if d.train_subset is not None and d.train_subset < len(idx):
        g = torch.Generator().manual_seed(derived_seed(0, 17))  # fixed subset, same for every seed
        idx = idx[torch.randperm(len(idx), generator=g)[: d.train_subset].sort().values]
    return idx, val


def prepare_data(cfg: Config, train: ArrayDataset | None = None, test: ArrayDataset | None = None,
                 progress: bool = True) -> RunData:
    """Load (or take) the train/test sets, carve the validation split (``data.val_size``), apply
    the fixed train subset, cut the held-out set (the validation split, else the first test images).

    With ``data.train_subset`` on a dataset stored one JPEG per image (image folders,
    Tiny-ImageNet), only the images used (subset + validation split) are decoded.
    """
    d = cfg.data
    spec = get_spec(d.dataset)
    if train is None and d.train_subset is not None and d.dataset in PARTIAL_DECODE:
        n_total = count_images(d.dataset, d.root, "train", download=d.download)
        idx, val_idx = train_indices(cfg, n_total)
        used = idx if val_idx is None else torch.cat([idx, val_idx]).unique()  # sorted
        part = load_dataset(d.dataset, d.root, "train", download=d.download, progress=progress, indices=used)
        train = part.subset(torch.searchsorted(used, idx))
        val = None if val_idx is None else part.subset(torch.searchsorted(used, val_idx))
    else:
        if train is None:
            train = load_dataset(d.dataset, d.root, "train", download=d.download, progress=progress)
        idx, val_idx = train_indices(cfg, len(train))
        val = None if val_idx is None else train.subset(val_idx)
        train = train.subset(idx) if len(idx) < len(train) else train
    if test is None and val is None:
        test = load_dataset(d.dataset, d.root, "test", download=d.download, progress=progress)
    held_out = val if val is not None else evaluation_subset(d.dataset, test, cfg.eval.n_examples)
    mean = tuple(spec.mean) if cfg.model.normalize and spec.mean else None
    std = tuple(spec.std) if cfg.model.normalize and spec.std else None
    return RunData(train, held_out, len(train.classes), int(train.images.shape[1]),
                   spec.crop_padding, spec.flip, mean, std, "test" if val is None else "validation")


def check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> bool:
    """Refuse to clobber an existing run. Returns True when there is a run to resume."""
    if resume and overwrite:
        raise InputError("--resume and --overwrite exclude each other: pick one")
    existing = [f for f in RUN_FILES if (run_dir / f).exists()]
    if run_dir.exists() and not run_dir.is_dir():
        raise InputError(f"run directory {str(run_dir)!r} is a file")
    if not existing:
        if resume:
            raise InputError(f"nothing to resume in {str(run_dir)!r} (no last.pt)")
        return False
    if overwrite:
        for f in existing:
            (run_dir / f).unlink()
        return False
    if resume:
        if not (run_dir / "last.pt").exists():
            raise InputError(f"{str(run_dir)!r} has no last.pt to resume from; use --overwrite to start again")
        return True
    raise InputError(
        f"run directory {str(run_dir)!r} already holds a run; pass --resume to continue it "
        "or --overwrite to start again"
    )


class Trainer:
    """Trains one config into one run directory. ``Trainer(cfg, run_dir).fit()``."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
        data: RunData | None = None,
        log=print,
    ):
        if not isinstance(cfg, Config):
            raise InputError(f"cfg must be an rpat Config (see rpat.config.build_config), got {type(cfg).__name__}")
        cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.progress = progress_enabled(progress)  # bars only on a terminal; the log has one line per epoch
        self.log = log
        self._critical = False  # inside the epoch-boundary writes: signals wait until they are done
        self._pending_signal: int | None = None
        self.is_main = context_from_env().is_main  # under torchrun only rank 0 touches the run directory
        if not self.is_main:
            self.log, self.progress = (lambda *a, **k: None), False
        resuming = check_run_dir(self.run_dir, resume, overwrite) if self.is_main else resume
        for stale in [*self.run_dir.glob(".*.tmp"), *self.run_dir.glob("epochs/.*.tmp")] if self.is_main else []:
            stale.unlink(missing_ok=True)  # temp files of a write that was killed (atomic_save)
        ckpt = load_checkpoint(self.run_dir / "last.pt") if resuming else None
        if ckpt is not None:
            cfg = config_from_dict(ckpt["config"]).validate()  # a resumed run keeps its own config
        self.cfg = cfg
        self.dist, self.device = setup(resolve_device(cfg.device))  # one process unless launched by torchrun
        t_data = time.perf_counter()
        self.data = data if data is not None else prepare_data(cfg, progress=self.progress)
        if data is None and time.perf_counter() - t_data > 2.0:
            self.log(f"data: {len(self.data.train)} training images, held-out {self._held_out_label()} "
                     f"({time.perf_counter() - t_data:.0f} s)")

        torch.manual_seed(derived_seed(cfg.seed, 0))
        self.model_kwargs = {"num_classes": self.data.num_classes, "in_chans": self.data.in_chans,
                             "mean": self.data.mean, "std": self.data.std}
        self.model = create_model(cfg.model.arch, **self.model_kwargs).to(self.device)
        sp = cfg.speed
        if sp.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if sp.sync_bn and self.dist.active:
            if self.device.type != "cuda":
                raise InputError("speed.sync_bn needs CUDA GPUs (SyncBatchNorm has no CPU kernel); set it to false")
            self.model = convert_sync_batchnorm(self.model, self.dist)
        # what the training step runs: DDP wrapper (several processes) and/or torch.compile; shares the weights
        self.step_model = wrap_model(self.model, self.dist, self.device)
        if sp.compile:
            self.step_model = torch.compile(self.step_model)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay, nesterov=o.nesterov)
        r = cfg.rpat
        rpat = RPATTerm(r.lam, r.alpha, r.proxy, r.start_epoch) if r.enabled else None
        teacher = cfg.teacher_term()
        self.objective = build_objective(cfg.method.name, cfg.train_threat(), rpat, teacher, **cfg.method_options())
        a = cfg.averaging
        self.averager = WeightAverage(self.model, a.decay, a.start_epoch) if a.enabled else None
        if teacher is not None:
            teacher.bind(self.averager.model)
        self.eval_threat = cfg.eval_threat()
        self.loader = DeviceLoader(self.data.train, per_rank_batch_size(cfg.data.batch_size, self.dist),
                                   self.device, shuffle=True, rank=self.dist.rank, world_size=self.dist.world_size,
                                   augment=cfg.data.augment, padding=self.data.padding,
                                   flip=self.data.flip, seed=cfg.seed, views=self.objective.method.views)
        self.graph_step = self._graph_step()
        held = self.data.held_out
        self.eval_x = held.images.float().div_(255)
        self.eval_y = held.labels

        self.start_epoch = 0
        self.best = {"pgd": -1.0, "epoch": -1}
        self.finished = False  #: resumed a run that had already finished: fit() changes nothing
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.averager is not None:
                if "averaged" not in ckpt:
                    raise InputError(f"{self.run_dir / 'last.pt'} has no averaged model to resume weight averaging")
                self.averager.load_state_dict(ckpt["averaged"])
            self.start_epoch = int(ckpt["epoch"])
            self.best = dict(ckpt["best"])
            # a finished run (every epoch done, final.pt written) is left exactly as it is
            self.finished = self.start_epoch >= cfg.optim.epochs and (self.run_dir / "final.pt").is_file()
            if self.finished:
                self.log(f"{self.run_dir} is already finished ({cfg.optim.epochs}/{cfg.optim.epochs} epochs, "
                         "final.pt written); nothing to resume, no file changed")
            else:
                self._truncate_metrics(self.start_epoch)
                self.log(f"resuming {self.run_dir} at epoch {self.start_epoch + 1}/{cfg.optim.epochs}")
        elif self.is_main:
            self._write_run_files()

    def _graph_step(self) -> GraphTrainStep | None:
        """The captured step of ``speed.cuda_graph`` (None when off; refused under DDP)."""
        mode = self.cfg.speed.cuda_graph
        if not mode:
            return None
        if self.dist.active:
            raise InputError("speed.cuda_graph is not supported under torchrun (DDP) yet; set it to false")
        return GraphTrainStep(cfg=self.cfg, model=self.model, step_model=self.step_model, objective=self.objective,
                              optimizer=self.optimizer, averager=self.averager, device=self.device,
                              capture=mode is True)

    # ---- bookkeeping -----------------------------------------------------------------
    def _write_run_files(self) -> None:
        try:
            self._write_run_files_unchecked()
        except OSError as e:
            raise InputError(f"cannot write to run directory {str(self.run_dir)!r}: {e.strerror or e}") from None

    def _write_run_files_unchecked(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        meta = {"rpat_version": __version__, "git_commit": git_commit(), "torch": torch.__version__,
                "python": platform.python_version(), "device": str(self.device),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "objective": self.objective.name,
                "threat": self.objective.method.threat.describe(),
                "train_images": len(self.data.train), "held_out_images": len(self.data.held_out),
                "selection": self._selection(), "evaluated_model": self._evaluated_model()}
        (self.run_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    def _held_out_label(self) -> str:
        """Where the held-out numbers (and the choice of best.pt) come from, for log lines and tables."""
        n = len(self.data.held_out)
        return f"validation split ({n} training images)" if self.data.selection == "validation" \
            else f"first {n} test images"

    def _selection(self) -> str:
        d = self.cfg.data
        if self.data.selection == "validation":
            return f"validation: {len(self.data.held_out)} training images held out (data.val_seed={d.val_seed})"
        return f"test: the first {len(self.data.held_out)} test images"

    def _evaluated_model(self) -> str:
        a = self.cfg.averaging
        if self.averager is None:
            return "online"
        return f"weight_average (EMA decay {a.decay}, from epoch {a.start_epoch + 1})"

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model evaluated, selected and saved as best/final: the WA model when averaging is on."""
        return self.averager.model if self.averager is not None else self.model

    def _truncate_metrics(self, epoch: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = []
        for ln in path.read_text().splitlines():
            try:
                if json.loads(ln)["epoch"] < epoch:
                    keep.append(ln)
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a kill
        path.write_text("".join(ln + "\n" for ln in keep))

    def _weights(self, epoch: int, model: torch.nn.Module | None = None, **extra: Any) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "rpat_version": __version__,
                "arch": self.cfg.model.arch, "model_kwargs": self.model_kwargs,
                "model": (model if model is not None else self.model).state_dict(), "epoch": epoch,
                "config": self.cfg.to_dict(), **extra}

    def _eval_weights(self, epoch: int, **extra: Any) -> dict[str, Any]:
        """A best/final/epoch checkpoint: the evaluated model's weights, tagged with which model it is."""
        return self._weights(epoch, self.eval_model,
                             weights="averaged" if self.averager is not None else "online", **extra)

    def lr(self, epoch: int, fraction: float) -> float:
        o = self.cfg.optim
        return lr_at(o.schedule, o.lr, epoch, fraction, o.epochs, o.milestones, o.gamma)

    # ---- the loop --------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of adversarial training; returns the mean loss terms and throughput."""
        model, opt = self.model, self.optimizer
        model.train()
        self.objective.method.threat = self.cfg.train_threat_at(epoch)  # the stronger adversary "$"
        self.loader.set_epoch(epoch)
        rank = [self.dist.rank] if self.dist.rank else []  # each rank its own attack starts
        gen = make_generator(self.device, derived_seed(self.cfg.seed, epoch, 1, *rank))
        amp = self.cfg.speed.amp == "bf16"
        channels_last = self.cfg.speed.channels_last
        n_steps = len(self.loader)
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        graph = self.graph_step  # speed.cuda_graph: the same step captured (rpat.training.cuda_graph)
        if graph is not None:
            graph.start_epoch(epoch, derived_seed(self.cfg.seed, epoch, 1, *rank),
                              [self.lr(epoch, s / n_steps) for s in range(n_steps)])
            key = phase_key(self.cfg, epoch)
        guard = graph.guard if graph is not None else NonFiniteGuard(model, opt, self.cfg.nonfinite, self.device)
        n_good = graph.n_good if graph is not None else torch.zeros((), device=self.device)  # nonfinite=skip
        torch.manual_seed(derived_seed(self.cfg.seed, epoch, 3))  # any global-RNG use is per-epoch seeded too
        t0 = time.perf_counter()
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", unit="batch",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        for step, (x, y) in enumerate(self.loader):
            lr = self.lr(epoch, step / n_steps)
            if graph is not None:
                graph.step(x, y, step, lr, key)
                sums, b = graph.sums_now(), y.shape[0]
            else:
                for group in opt.param_groups:
                    group["lr"] = lr
                guard.snapshot()
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):  # fp32 master weights
                    loss, terms = self.objective.step(self.step_model, x, y, epoch, gen)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                ok = guard.observe(step, loss, terms)  # on-device flag, no sync
                opt.step()
                guard.restore_if_bad(ok)  # nonfinite=skip: undo a bad step (torch.where, no sync)
                if self.averager is not None:
                    self.averager.update(model, epoch)
                b = y.shape[0]
                for k, v in terms.items():
                    if guard.skip:
                        v = torch.where(ok, v, torch.zeros_like(v))
                    sums[k] = sums[k] + v * b if k in sums else v * b
                if guard.skip:
                    n_good = n_good + ok * b
            seen += b
            bar.update(1)
            at_interval = (step + 1) % self.cfg.log_interval == 0 or step + 1 == n_steps
            if at_interval:
                guard.check(epoch, n_steps)  # one host sync per interval; raises for nonfinite=stop
            if self.progress and at_interval:
                means = self._means(sums, n_good if guard.skip else seen)  # one host sync per interval
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix({"img/s": f"{rate:.0f}", **{k: f"{v:.4f}" for k, v in means.items()}})
        bar.close()
        n_bad = guard.check(epoch, n_steps)
        if self.dist.active:  # metrics over all ranks' images (each rank saw as many)
            reduced = all_reduce_sum({**sums, "__n_good": n_good}, self.dist)
            n_good = reduced.pop("__n_good")
            sums, seen = reduced, seen * self.dist.world_size
        out = self._means(sums, n_good if guard.skip else seen)
        if guard.skip:
            out["skipped_steps"] = float(n_bad)
        out["seconds"] = time.perf_counter() - t0
        out["images_per_s"] = seen / max(out["seconds"], 1e-9)
        out["lr"] = self.lr(epoch, 0.0)
        return out

    @staticmethod
    def _means(sums: dict[str, torch.Tensor], n: int | torch.Tensor) -> dict[str, float]:
        if not sums:
            return {}
        vals = (torch.stack(list(sums.values())) / n).tolist()
        return dict(zip(sums.keys(), vals, strict=True))

    def evaluate_held_out(self, model: torch.nn.Module | None = None) -> dict[str, float]:
        """Clean and PGD accuracy (percent) on the held-out images, fixed attack seed.

        ``model`` defaults to :attr:`eval_model` (the WA model when averaging is on).
        """
        bs = self.cfg.eval.batch_size
        model = self.eval_model if model is None else model
        clean = accuracy(model, self.eval_x, self.eval_y, batch_size=bs, device=self.device,
                         progress=self.progress)
        robust = pgd_accuracy(model, self.eval_x, self.eval_y, self.eval_threat, batch_size=bs,
                              device=self.device, seed=derived_seed(self.cfg.seed, 2), progress=self.progress)
        return {"clean": clean, "pgd": robust}

    # ---- stopping safely --------------------------------------------------------------
    @contextmanager
    def _stop_on_signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM raise TrainingInterrupted (deferred while checkpoints are being written)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            if self._critical:
                self._pending_signal = signum
            else:
                raise TrainingInterrupted(signum)

        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    @contextmanager
    def _critical_section(self) -> Iterator[None]:
        """The epoch-boundary writes run to the end; a signal received meanwhile is raised after."""
        self._critical = True
        try:
            yield
        finally:
            self._critical = False
        self._end_critical()

    def _end_critical(self) -> None:
        """Leave the critical section; act on a signal that arrived inside it."""
        self._critical = False
        if self._pending_signal is not None:
            signum, self._pending_signal = self._pending_signal, None
            raise TrainingInterrupted(signum)

    def _weights_finite(self) -> bool:
        """Whether every floating-point weight and buffer is finite (one host read)."""
        flags = [t.isfinite().all() for t in self.model.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True

    def fit(self) -> dict[str, Any]:
        """Train from the start (or the resumed epoch) to the end; returns a summary.

        SIGINT/SIGTERM stop the run at once with :class:`TrainingInterrupted` (the
        unfinished epoch is discarded; ``last.pt`` holds the last finished one, and
        ``--resume`` continues bit for bit). Non-finite losses are handled by
        ``cfg.nonfinite`` (:mod:`rpat.training.nonfinite`); non-finite weights are
        never saved.
        """
        self._epoch = self.start_epoch
        if self.finished:
            return self._summary()
        with self._stop_on_signals():
            try:
                return self._fit()
            except TrainingInterrupted as e:
                done = self._saved_epoch()
                msg = (f"stopped by {signal.Signals(e.signum).name} in epoch {self._epoch + 1}/"
                       f"{self.cfg.optim.epochs}; {self.run_dir / 'last.pt'} holds {done} finished epoch(s) "
                       f"(the unfinished one is discarded); resume exactly with: "
                       f"rpat train --run-dir {self.run_dir} --resume")
                raise TrainingInterrupted(e.signum, msg) from None

    def _saved_epoch(self) -> int:
        try:
            return int(load_checkpoint(self.run_dir / "last.pt")["epoch"])
        except InputError:
            return 0

    def _save(self, obj: dict[str, Any], path: Path) -> None:
        """``atomic_save`` on rank 0 only (every process when not distributed)."""
        if self.is_main:
            atomic_save(obj, path)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        try:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise InputError(f"cannot write {str(self.run_dir / 'metrics.jsonl')!r}: {e.strerror or e}") from None

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.start_epoch == 0 and not (self.run_dir / "last.pt").exists():
            with self._critical_section():  # so that a run stopped in its first epoch can be resumed too
                self._save(self._weights(0, optimizer=self.optimizer.state_dict(), best=self.best),
                            self.run_dir / "last.pt")
        for epoch in range(self.start_epoch, cfg.optim.epochs):
            self._epoch = epoch
            train_stats = self.train_epoch(epoch)
            if not all(math.isfinite(v) for v in train_stats.values()):
                raise NonFiniteLossError(f"non-finite training loss in epoch {epoch + 1}: {train_stats}")
            if not self._weights_finite():
                raise NonFiniteLossError(f"the weights became non-finite in epoch {epoch + 1}; nothing saved "
                                         "(last.pt keeps the last finished epoch)")
            t_eval = time.perf_counter()
            ev = self.evaluate_held_out()
            online = self.evaluate_held_out(self.model) if self.averager is not None else None
            t_eval = time.perf_counter() - t_eval
            improved = ev["pgd"] > self.best["pgd"]
            self._critical = True  # the epoch-boundary writes below finish before a signal is acted on
            if improved:
                self.best = {"pgd": ev["pgd"], "clean": ev["clean"], "epoch": epoch}
                self._save(self._eval_weights(epoch + 1, held_out=ev), self.run_dir / "best.pt")
            done = epoch + 1
            if cfg.save_every and done % cfg.save_every == 0:
                self._save(self._eval_weights(done, held_out=ev), self.run_dir / "epochs" / f"epoch_{done:04d}.pt")
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                      "train_eps": self.objective.method.threat.eps, "train_steps": self.objective.method.threat.steps,
                      "held_out_clean": ev["clean"], "held_out_pgd": ev["pgd"], "best": improved}
            if online is not None:
                record.update(online_held_out_clean=online["clean"], online_held_out_pgd=online["pgd"])
            self._append_metrics(record)  # before last.pt: a resume drops rows >= its epoch
            extra = {"averaged": self.averager.state_dict()} if self.averager is not None else {}
            self._save(self._weights(done, optimizer=self.optimizer.state_dict(), best=self.best, **extra),
                        self.run_dir / "last.pt")
            self._end_critical()
            terms = " ".join(f"{k}={v:.4f}" for k, v in train_stats.items()
                             if k not in ("seconds", "images_per_s", "lr", "skipped_steps"))
            self.log(f"epoch {done}/{cfg.optim.epochs} lr={train_stats['lr']:.4g} {terms} "
                     f"| {'WA ' if online is not None else ''}held-out ({self._held_out_label()}) "
                     f"clean {ev['clean']:.2f} PGD-{self.eval_threat.steps} {ev['pgd']:.2f}"
                     f"{' *best so far*' if improved else ''} | {train_stats['images_per_s']:.0f} img/s, "
                     f"{train_stats['seconds']:.0f} s + held-out eval {t_eval:.0f} s")
        self._save(self._eval_weights(cfg.optim.epochs), self.run_dir / "final.pt")
        return self._summary()

    def _summary(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"run_dir": str(self.run_dir), "best_epoch": self.best["epoch"] + 1,
                "best_held_out_pgd": self.best["pgd"], "epochs": cfg.optim.epochs,
                "selection": self._selection(), "evaluated_model": self._evaluated_model(),
                "held_out": self._held_out_label(), "already_finished": self.finished}


def train(cfg: Config, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Convenience: ``Trainer(cfg, run_dir, **kwargs).fit()``."""
    return Trainer(cfg, run_dir, **kwargs).fit()

"""The trainer: one loop for every method (base objective + optional RPAT term), into one run directory.

The run directory's files are described in :mod:`rpat.run_dir`; the step each batch runs is
:class:`rpat.training.step.TrainStep`.

Determinism: every random draw of epoch ``e`` (batch order, augmentation,
attack starts) comes from generators seeded by ``(seed, e)`` alone, and the
learning rate is a pure function of ``(e, step)``. Restoring the model and the
optimizer at an epoch boundary therefore continues the run exactly as if it
had never stopped (bit for bit on CPU).
"""

from __future__ import annotations

import math
import platform
import signal
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from .. import run_dir as rd
from ..checkpoint import FORMAT, FORMAT_VERSION, atomic_save, extract_state_dict, load_checkpoint
from ..config import Config, config_from_dict, dump_yaml
from ..data import DeviceLoader
from ..data.batch_augment import BatchAugment
from ..data.mixed import MixedLoader
from ..distributed import (
    all_reduce_sum,
    barrier,
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
from ..models.loading import load_weights
from ..utils import derived_seed, file_identity, git_commit, progress_enabled, resolve_device, write_text_atomic
from .awp import build_awp
from .cuda_graph import GraphTrainStep, phase_key
from .nonfinite import NonFiniteLossError
from .preemption import (
    check_resumable,
    gather_states,
    mid_epoch_record,
    rank_state,
    restore_global_rng,
    restore_rank_state,
)
from .run_data import RunData, extra_source, prepare_data
from .schedules import lr_at, lr_scaling_line, scaled_lr
from .signals import SignalGuard, TrainingInterrupted, TrainingPreempted
from .step import TrainStep
from .tensorboard import RunLogger


def format_duration(seconds: float) -> str:
    """``"42 s"``, ``"1 min 6 s"``, ``"2 h 5 min"``: a duration for log lines (ETA), whole units."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Trainer:
    """Trains one config into one run directory. ``Trainer(cfg, run_dir).fit()``."""

    #: Without bars (stderr not a terminal) but with progress asked for, a line like ``epoch 3/110
    #: step 120/391 (31%) 245 img/s, ETA 1 min 6 s | loss=1.2345`` goes to the log at the first step
    #: boundary at least this many wall-clock seconds after the epoch's start or the previous line
    #: (0: at every step; None: never). An epoch shorter than this logs only its epoch line.
    progress_every_s: float | None = 30.0

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
        epochs: int | None = None,
    ):
        if not isinstance(cfg, Config):
            raise InputError(f"cfg must be an rpat Config (see rpat.config.build_config), got {type(cfg).__name__}")
        cfg = cfg.validate()
        self.run_dir = Path(run_dir)
        self.progress = progress_enabled(progress)  # bars only on a terminal; the log has one line per epoch
        # off a terminal, progress asked for: a step line every progress_every_s seconds instead of bars
        self.step_lines = bool(progress) and not self.progress
        self.log = log
        self.signals = SignalGuard()  # SIGINT/SIGTERM wait while the epoch-boundary writes run
        self.is_main = context_from_env().is_main  # under torchrun only rank 0 touches the run directory
        if not self.is_main:
            self.log, self.progress, self.step_lines = (lambda *a, **k: None), False, False
        resuming = rd.check_run_dir(self.run_dir, resume, overwrite) if self.is_main else resume
        if self.is_main:
            rd.remove_stale_temporaries(self.run_dir)
        ckpt = load_checkpoint(self.run_dir / rd.LAST) if resuming else None
        if ckpt is not None:
            cfg = config_from_dict(ckpt["config"]).validate()  # a resumed run keeps its own config
            if epochs is not None and epochs != cfg.optim.epochs:
                cfg = self._extended(cfg, epochs, int(ckpt["epoch"]))
        self.cfg = cfg
        for w in cfg.warnings():
            self.log(f"rpat: warning: {w}")
        if (line := lr_scaling_line(cfg.optim.lr, cfg.data.batch_size, cfg.optim.lr_scaling)) is not None:
            self.log(line)
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
        if ckpt is None and cfg.model.init is not None:  # fine-tuning: the starting weights (a resume has its own)
            load_weights(self.model, extract_state_dict(load_checkpoint(cfg.model.init)), cfg.model.arch)
            self.log(f"model.init: starting from the weights of {cfg.model.init}")
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
        self.objective = cfg.objective()
        a = cfg.averaging
        self.averager = (WeightAverage(self.model, a.decay, a.start_epoch, warmup=a.warmup, bn=a.bn)
                         if a.enabled else None)
        if self.objective.teacher is not None:
            self.objective.teacher.bind(self.averager.model)
        self.eval_threat = cfg.eval_threat()
        self.loader = DeviceLoader(self.data.train, per_rank_batch_size(cfg.data.batch_size, self.dist),
                                   self.device, shuffle=True, rank=self.dist.rank, world_size=self.dist.world_size,
                                   augment=cfg.data.augment, padding=self.data.padding,
                                   flip=self.data.flip, seed=cfg.seed, views=self.objective.method.views,
                                   batch_augment=BatchAugment.from_config(cfg.data, self.data.num_classes))
        if cfg.data.extra is not None:  # a fixed share of every batch from the extra set (rpat.data.mixed)
            self.loader = MixedLoader(self.loader, extra_source(cfg, self.data), cfg.data.extra_fraction)
            self.log(self.loader.describe())
        self.graph_step = self._graph_step()
        self.awp = build_awp(cfg, self.model, self.objective, self.dist)  # None when awp.enabled is false
        self.train_step = self.graph_step.train_step if self.graph_step is not None else TrainStep(
            model=self.model, step_model=self.step_model, objective=self.objective, optimizer=self.optimizer,
            averager=self.averager, nonfinite=cfg.nonfinite, device=self.device, amp=sp.amp == "bf16",
            channels_last=sp.channels_last, awp=self.awp)
        if cfg.data.extra is not None and cfg.data.extra_label_smoothing > 0:  # smoothing of the extra rows only
            self.train_step.row_smoothing = self.loader.smoothing(self.objective.method.label_smoothing,
                                                                  cfg.data.extra_label_smoothing)
        held = self.data.held_out
        self.eval_x = held.images.float().div_(255)
        self.eval_y = held.labels

        self.start_epoch = 0
        self.best = {"pgd": -1.0, "epoch": -1}
        self.finished = False  #: resumed a run that had already finished: fit() changes nothing
        #: the training stats of epoch ``start_epoch`` (1-based) when its held-out evaluation was
        #: interrupted: last.pt holds the trained epoch, and fit() evaluates and records it first
        self.held_out_pending: dict[str, float] | None = None
        self.mid_epoch: dict[str, Any] | None = None  #: a mid-epoch save being resumed (rpat.training.preemption)
        self._rng_after_replay: dict[str, Any] | None = None  # its global generator states, set after the replay
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.averager is not None:
                if "averaged" not in ckpt:
                    raise InputError(f"{self.run_dir / 'last.pt'} has no averaged model to resume weight averaging")
                self.averager.load_state_dict(ckpt["averaged"])
            self.start_epoch = int(ckpt["epoch"])
            self.mid_epoch = ckpt.get("mid_epoch")
            self.best = dict(ckpt["best"])
            pending = ckpt.get("held_out_pending")
            self.held_out_pending = {k: float(v) for k, v in pending.items()} if pending is not None else None
            # a finished run (every epoch done, final.pt written) is left exactly as it is
            self.finished = (self.start_epoch >= cfg.optim.epochs and self.held_out_pending is None
                             and (self.run_dir / rd.FINAL).is_file())
            if self.finished:
                self.log(f"{self.run_dir} is already finished ({cfg.optim.epochs}/{cfg.optim.epochs} epochs, "
                         "final.pt written); nothing to resume, no file changed")
            elif self.held_out_pending is not None:
                # the pending epoch's row (if a kill left one) is written again, from the same numbers
                rd.truncate_metrics(self.run_dir, self.start_epoch - 1)
                then = (f"epoch {self.start_epoch + 1}/{cfg.optim.epochs}" if self.start_epoch < cfg.optim.epochs
                        else "final.pt")
                self.log(f"resuming {self.run_dir}: first the held-out evaluation of epoch "
                         f"{self.start_epoch}/{cfg.optim.epochs} (trained, its evaluation was stopped), "
                         f"then {then}")
            else:
                rd.truncate_metrics(self.run_dir, self.start_epoch)
                at = f" step {self.mid_epoch['step'] + 1}/{self.mid_epoch['n_steps']}" if self.mid_epoch else ""
                self.log(f"resuming {self.run_dir} at epoch {self.start_epoch + 1}/{cfg.optim.epochs}{at}")
        elif self.is_main:
            self._write_run_files()
        #: rank 0's TensorBoard writer (logging.tensorboard; None when off, on other ranks, or run finished)
        self.tb = (RunLogger.for_run(self.cfg, self.run_dir, resumed=ckpt is not None)
                   if self.is_main and not self.finished else None)

    def _extended(self, cfg: Config, epochs: int, done: int) -> Config:
        """``--resume --epochs N``: the run continued to ``N`` epochs (a continuation, not the run it would
        have been with N from the start): piecewise milestones and every other epoch-numbered setting keep
        their epochs, so the lr stays at its last value; a cosine schedule is refused (its curve depends on
        the total and would jump)."""
        old = cfg.optim.epochs
        if epochs < old:
            raise InputError(f"the run has {old} epochs; --resume --epochs {epochs} can only extend it (N > {old})")
        if cfg.optim.schedule == "cosine":
            raise InputError(f"cannot extend a cosine schedule ({old} epochs) exactly: its lr curve depends on the "
                             "total; start a new run with --epochs instead")
        new = config_from_dict(cfg.to_dict())
        new.optim.epochs = epochs
        new.validate()
        self.log(f"extending {self.run_dir} from {old} to {epochs} epochs ({done} done): a continuation; the "
                 f"{cfg.optim.schedule} schedule keeps its milestones {cfg.optim.milestones}, so the lr stays at "
                 "its last value; final.pt is rewritten at the end")
        if self.is_main:
            write_text_atomic(self.run_dir / rd.CONFIG, dump_yaml(new))
        return new

    def _graph_step(self) -> GraphTrainStep | None:
        """The captured step of ``speed.cuda_graph`` (None when off; refused under DDP)."""
        mode = self.cfg.speed.cuda_graph
        if not mode:
            return None
        if self.dist.active:
            raise InputError("speed.cuda_graph is not supported under torchrun (DDP) yet; set it to false")
        sp = self.cfg.speed
        return GraphTrainStep(model=self.model, step_model=self.step_model, objective=self.objective,
                              optimizer=self.optimizer, averager=self.averager, device=self.device,
                              nonfinite=self.cfg.nonfinite, amp=sp.amp == "bf16", channels_last=sp.channels_last,
                              capture=mode is True)

    def phase_key(self, epoch: int) -> tuple:
        """The capture key of 0-based ``epoch`` (:func:`rpat.training.cuda_graph.phase_key`)."""
        a = self.cfg.averaging
        return phase_key(self.objective, epoch, threat=self.cfg.train_threat_at(epoch),
                         averaging_start=a.start_epoch if a.enabled else None)

    # ---- bookkeeping -----------------------------------------------------------------
    def _write_run_files(self) -> None:
        try:
            self._write_run_files_unchecked()
        except OSError as e:
            raise InputError(f"cannot write to run directory {str(self.run_dir)!r}: {e.strerror or e}") from None

    def _write_run_files_unchecked(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.run_dir / rd.CONFIG, dump_yaml(self.cfg))
        meta = {"rpat_version": __version__, "git_commit": git_commit(), "torch": torch.__version__,
                "python": platform.python_version(), "device": str(self.device),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "objective": self.objective.name,
                "threat": self.objective.method.threat.describe(),
                "train_images": len(self.data.train), "held_out_images": len(self.data.held_out),
                "selection": self._selection(), "evaluated_model": self._evaluated_model()}
        if self.cfg.model.init is not None:
            meta["init"] = {"path": str(self.cfg.model.init), **file_identity(self.cfg.model.init)}
        rd.write_meta(self.run_dir, meta)

    def _held_out_label(self) -> str:
        """Where the held-out numbers (and the choice of best.pt) come from, for log lines and tables."""
        return rd.held_out_label(self.data.selection, len(self.data.held_out))

    def _selection(self) -> str:
        return rd.selection_record(self.data.selection, len(self.data.held_out), self.cfg.data.val_seed)

    def _evaluated_model(self) -> str:
        a = self.cfg.averaging
        if self.averager is None:
            return "online"
        return f"weight_average (EMA decay {a.decay}, from epoch {a.start_epoch + 1})"

    @property
    def eval_model(self) -> torch.nn.Module:
        """The model evaluated, selected and saved as best/final: the WA model when averaging is on."""
        return self.averager.model if self.averager is not None else self.model

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
        base = scaled_lr(o.lr, self.cfg.data.batch_size, o.lr_scaling)  # optim.lr_scaling (schedules.py)
        return lr_at(o.schedule, base, epoch, fraction, o.epochs, o.milestones, o.gamma, o.warmup_epochs)

    # ---- the loop --------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of adversarial training; returns the mean loss terms and throughput."""
        self.model.train()
        self.objective.method.threat = self.cfg.train_threat_at(epoch)  # the stronger adversary "$", the ε ramp
        self.loader.set_epoch(epoch)
        rank = [self.dist.rank] if self.dist.rank else []  # each rank its own attack starts
        seed = derived_seed(self.cfg.seed, epoch, 1, *rank)
        n_steps = len(self.loader)
        ts, graph = self.train_step, self.graph_step  # graph: speed.cuda_graph, the same step captured
        if graph is not None:
            graph.start_epoch(epoch, seed, [self.lr(epoch, s / n_steps) for s in range(n_steps)])
            key = self.phase_key(epoch)
        else:
            ts.start_epoch(epoch, seed)
        guard = ts.guard
        seen = 0
        torch.manual_seed(derived_seed(self.cfg.seed, epoch, 3))  # any global-RNG use is per-epoch seeded too
        t0 = time.perf_counter()
        start, seen, t0 = self._resume_mid_epoch(epoch, n_steps, t0)  # (0, 0, t0) unless resuming mid-epoch
        every = self.progress_every_s if self.step_lines else None
        next_line = t0 + every if every is not None else math.inf  # a clock read per step, no device sync
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", unit="batch", initial=start,
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        for step, (x, y) in self._epoch_batches(start):  # a mid-epoch resume replays the first `start`
            lr = self.lr(epoch, step / n_steps)
            if graph is not None:
                graph.step(x, y, step, lr, key)
            else:
                ts.set_lr(lr)
                ts(x, y, step)
            seen += y.shape[0]
            bar.update(1)
            at_interval = (step + 1) % self.cfg.log_interval == 0 or step + 1 == n_steps
            if at_interval:
                guard.check(epoch, n_steps)  # one host sync per interval; raises for nonfinite=stop
            if self.progress and at_interval:
                means = self._means(ts.sums_now(), ts.n_good if guard.skip else seen)  # one host sync
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix({"img/s": f"{rate:.0f}", **{k: f"{v:.4f}" for k, v in means.items()}})
            if every is not None and step + 1 < n_steps and time.perf_counter() >= next_line:
                means = self._means(ts.sums_now(), ts.n_good if guard.skip else seen)  # the one host read
                now = time.perf_counter()  # after the read: the device has caught up
                self.log(self._step_line(epoch, step + 1, n_steps, seen * self.dist.world_size, now - t0, means))
                next_line = now + every
            if self._stop_mid_epoch(step, n_steps, at_interval):  # a save signal: save here, then stop
                bar.close()
                self._save_mid_epoch(epoch, step + 1, n_steps, seen, time.perf_counter() - t0)
        bar.close()
        n_bad = guard.check(epoch, n_steps)
        sums, n_good = ts.sums_now(), ts.n_good
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

    def _step_line(self, epoch: int, done: int, n_steps: int, seen: int, elapsed: float,
                   means: dict[str, float]) -> str:
        """``epoch 3/110 step 120/391 (31%) 245 img/s, ETA 1 min 6 s | loss=1.2345``: progress without bars."""
        rate = seen / max(elapsed, 1e-9)
        eta = elapsed / done * (n_steps - done)
        terms = " ".join(f"{k}={v:.4f}" for k, v in means.items())
        return (f"epoch {epoch + 1}/{self.cfg.optim.epochs} step {done}/{n_steps} ({100 * done / n_steps:.0f}%) "
                f"{rate:.0f} img/s, ETA {format_duration(eta)}" + (f" | {terms}" if terms else ""))

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
    def _weights_finite(self) -> bool:
        """Whether every floating-point weight and buffer is finite (one host read)."""
        flags = [t.isfinite().all() for t in self.model.state_dict().values() if t.is_floating_point()]
        return bool(torch.stack(flags).all()) if flags else True

    def fit(self) -> dict[str, Any]:
        """Train from the start (or the resumed epoch) to the end; returns a summary.

        SIGINT/SIGTERM stop the run at once with :class:`TrainingInterrupted` (the
        unfinished epoch is discarded; ``last.pt`` holds the last finished one, and
        ``--resume`` continues bit for bit). A trained epoch is saved to ``last.pt``
        before its held-out evaluation (marked ``held_out_pending``, with its training
        stats); a stop during the evaluation keeps it, and the resume evaluates it
        first (same weights, same seed), so best.pt and metrics.jsonl end as in an
        uninterrupted run. Non-finite losses are handled by
        ``cfg.nonfinite`` (:mod:`rpat.training.nonfinite`); non-finite weights are
        never saved. Save signals (``self.signals.save_on(SIGUSR2, ...)``, as the SLURM task sets them)
        instead stop after the current step with a mid-epoch last.pt, or at the epoch end during the
        held-out evaluation, raising :class:`TrainingPreempted` (:mod:`rpat.training.preemption`).
        """
        self._epoch = self.start_epoch
        if self.finished:
            return self._summary()
        with self.signals.installed():
            try:
                return self._fit()
            except TrainingPreempted:
                raise  # last.pt was written at the safe point; the message says where
            except TrainingInterrupted as e:
                done, pending = self._saved_epoch()
                n = self.cfg.optim.epochs
                if pending and done == self._epoch + 1:  # stopped in the held-out evaluation of a trained epoch
                    where, what = (f"in the held-out evaluation of epoch {done}/{n}",
                                   f"(the resume evaluates epoch {done} first)")
                else:
                    where, what = f"in epoch {self._epoch + 1}/{n}", "(the unfinished one is discarded)"
                msg = (f"stopped by {signal.Signals(e.signum).name} {where}; {self.run_dir / 'last.pt'} holds "
                       f"{done} finished epoch(s) {what}; resume exactly with: "
                       f"rpat train --run-dir {self.run_dir} --resume")
                raise TrainingInterrupted(e.signum, msg) from None

    def _saved_epoch(self) -> tuple[int, bool]:
        """The epochs last.pt holds, and whether the held-out evaluation of the last one is pending."""
        try:
            ckpt = load_checkpoint(self.run_dir / rd.LAST)
        except InputError:
            return 0, False
        return int(ckpt["epoch"]), ckpt.get("held_out_pending") is not None

    def _save(self, obj: dict[str, Any], path: Path) -> None:
        """``atomic_save`` on rank 0 only (every process when not distributed)."""
        if self.is_main:
            atomic_save(obj, path)

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if self.is_main:
            rd.append_metrics(self.run_dir, record)

    def _save_last(self, done: int, held_out_pending: dict[str, float] | None = None) -> None:
        """last.pt after ``done`` epochs: model, optimizer, best so far, averaged model; with
        ``held_out_pending`` (the epoch's training stats) also the mark that epoch ``done``'s held-out
        evaluation is not recorded yet (a resume runs it first)."""
        extra: dict[str, Any] = {"averaged": self.averager.state_dict()} if self.averager is not None else {}
        if held_out_pending is not None:
            extra["held_out_pending"] = dict(held_out_pending)
        self._save(self._weights(done, optimizer=self.optimizer.state_dict(), best=self.best, **extra),
                   self.run_dir / rd.LAST)

    def _epoch_end_writes(self, epoch: int, ev: dict[str, float], online: dict[str, float] | None,
                          train_stats: dict[str, float]) -> bool:
        """best.pt (if improved), epochs/, the metrics row, then last.pt; returns whether best improved."""
        cfg = self.cfg
        improved = ev["pgd"] > self.best["pgd"]
        if improved:
            self.best = {"pgd": ev["pgd"], "clean": ev["clean"], "epoch": epoch}
            self._save(self._eval_weights(epoch + 1, held_out=ev), self.run_dir / rd.BEST)
        done = epoch + 1
        if cfg.save_every and done % cfg.save_every == 0:
            self._save(self._eval_weights(done, held_out=ev), rd.epoch_path(self.run_dir, done))
        threat = cfg.train_threat_at(epoch)  # what train_epoch trained with (also when recovered on resume)
        # "epoch" is 0-based (as the config's start_epoch keys); "epoch_number" is the console's 1-based count
        record = {"epoch": epoch, "epoch_number": epoch + 1, **{f"train_{k}": v for k, v in train_stats.items()},
                  "train_eps": threat.eps, "train_steps": threat.steps,
                  "held_out_clean": ev["clean"], "held_out_pgd": ev["pgd"], "best": improved}
        if online is not None:
            record.update(online_held_out_clean=online["clean"], online_held_out_pgd=online["pgd"])
        self._append_metrics(record)  # before last.pt: a resume drops rows >= its epoch
        if self.tb is not None:
            self.tb.log_epoch(record)  # the same numbers, to <run_dir>/tb (rpat.training.tensorboard)
        self._save_last(done)  # the updated best; no pending mark
        return improved

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        if self.start_epoch == 0 and not (self.run_dir / rd.LAST).exists():
            with self.signals.critical():  # so that a run stopped in its first epoch can be resumed too
                self._save(self._weights(0, optimizer=self.optimizer.state_dict(), best=self.best),
                           self.run_dir / rd.LAST)
        if self.held_out_pending is not None:  # a resume after a stop in the held-out evaluation
            self._epoch = self.start_epoch - 1
            self._held_out_and_writes(self._epoch, self.held_out_pending)
            self.held_out_pending = None
            if self.start_epoch < cfg.optim.epochs:
                self._stop_at_epoch_end(self._epoch)
        for epoch in range(self.start_epoch, cfg.optim.epochs):
            self._epoch = epoch
            train_stats = self.train_epoch(epoch)
            if not all(math.isfinite(v) for v in train_stats.values()):
                raise NonFiniteLossError(f"non-finite training loss in epoch {epoch + 1}: {train_stats}")
            if not self._weights_finite():
                raise NonFiniteLossError(f"the weights became non-finite in epoch {epoch + 1}; nothing saved "
                                         "(last.pt keeps the last finished epoch)")
            with self.signals.critical():  # the trained epoch is kept even if the evaluation is stopped
                self._save_last(epoch + 1, held_out_pending=train_stats)
            self._held_out_and_writes(epoch, train_stats)
            if epoch + 1 < cfg.optim.epochs:  # after the last one final.pt comes first (the signal waits)
                self._stop_at_epoch_end(epoch)
        self._save(self._eval_weights(cfg.optim.epochs), self.run_dir / rd.FINAL)
        if self.tb is not None:
            self.tb.close()
        return self._summary()

    # ---- save signals: mid-epoch and epoch-end safe points (rpat.training.preemption) ---------------
    def _save_requested_everywhere(self) -> bool:
        """Whether a save signal arrived (under DDP: on any rank; one collective, every rank calls it)."""
        asked = self.signals.save_requested is not None
        if not self.dist.active:
            return asked
        flag = all_reduce_sum({"stop": torch.tensor(float(asked), device=self.device)}, self.dist)["stop"]
        return bool(flag > 0)

    def _stop_mid_epoch(self, step: int, n_steps: int, at_interval: bool) -> bool:
        """After step ``step``: stop here for a save signal? Not after the epoch's last step (the epoch end is
        the safe point then), nor under speed.cuda_graph (its epochs end first); under DDP the ranks agree at
        log intervals (one small collective each, only when save signals are on). No device sync otherwise."""
        if not self.signals.save_signals or step + 1 >= n_steps or self.graph_step is not None:
            return False
        if self.dist.active and not at_interval:
            return False
        return self._save_requested_everywhere()

    def _save_mid_epoch(self, epoch: int, next_step: int, n_steps: int, seen: int, seconds: float) -> None:
        """last.pt at step ``next_step`` of ``epoch`` (with its ``mid_epoch`` entry), then TrainingPreempted."""
        states = gather_states(rank_state(self.train_step, self.device), self.dist)
        mid = mid_epoch_record(epoch, next_step, n_steps, seen, seconds, states)
        extra: dict[str, Any] = {"averaged": self.averager.state_dict()} if self.averager is not None else {}
        with self.signals.critical():
            self._save(self._weights(epoch, optimizer=self.optimizer.state_dict(), best=self.best, mid_epoch=mid,
                                     **extra), self.run_dir / rd.LAST)
        self._preempted(f"after step {next_step}/{n_steps} of epoch {epoch + 1}/{self.cfg.optim.epochs} "
                        "(mid-epoch: step position, loss sums, guard counters and generator states saved)")

    def _stop_at_epoch_end(self, epoch: int) -> None:
        """After epoch ``epoch``'s writes (last.pt holds it): stop for a save signal."""
        if self.signals.save_signals and self._save_requested_everywhere():
            self._preempted(f"at the end of epoch {epoch + 1}/{self.cfg.optim.epochs}")

    def _preempted(self, where: str) -> None:
        signum = self.signals.save_requested or self.signals.save_signals[0]
        self.signals.save_requested = None  # acted on
        barrier(self.dist)  # under DDP no rank leaves before rank 0 has written last.pt
        name = signal.Signals(signum).name
        self.log(f"{name}: saved {self.run_dir / rd.LAST} {where}")
        raise TrainingPreempted(signum, f"stopped by {name} {where}; {self.run_dir / rd.LAST} holds it; "
                                f"resume exactly with: rpat train --run-dir {self.run_dir} --resume")

    def _resume_mid_epoch(self, epoch: int, n_steps: int, t0: float) -> tuple[int, int, float]:
        """``(first step, images seen, t0)`` of ``epoch``: ``(0, 0, t0)``, or where a mid-epoch save stopped
        (its generator states, sums and guard flags put back into the train step; ``t0`` moved back by the
        epoch's earlier seconds, so its img/s counts the whole epoch)."""
        mid, self.mid_epoch = self.mid_epoch, None
        if mid is None:
            return 0, 0, t0
        self._rng_after_replay = check_resumable(mid, epoch, n_steps, self.dist)
        restore_rank_state(self.train_step, self._rng_after_replay, self.device)
        return int(mid["step"]), int(mid["seen"]), t0 - float(mid["seconds"])

    def _epoch_batches(self, start: int) -> Iterator[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
        """``(step, (x, y))`` from step ``start`` on: the loader's first ``start`` batches are made and dropped
        (its generators are seeded by ``(seed, epoch)``, so this puts them where they were), then the global
        generators of a mid-epoch save are restored."""
        batches = enumerate(self.loader)
        for _ in islice(batches, start):
            pass
        state, self._rng_after_replay = self._rng_after_replay, None
        if state is not None:
            restore_global_rng(state, self.device)
        yield from batches

    def _held_out_and_writes(self, epoch: int, train_stats: dict[str, float]) -> None:
        """Evaluate trained epoch ``epoch`` (0-based) on the held-out images, write best.pt/epochs/the
        metrics row/last.pt, and log the epoch's line."""
        cfg = self.cfg
        t_eval = time.perf_counter()
        ev = self.evaluate_held_out()
        online = self.evaluate_held_out(self.model) if self.averager is not None else None
        t_eval = time.perf_counter() - t_eval
        with self.signals.critical():  # the epoch-boundary writes finish before a signal is acted on
            improved = self._epoch_end_writes(epoch, ev, online, train_stats)
        terms = " ".join(f"{k}={v:.4f}" for k, v in train_stats.items()
                         if k not in ("seconds", "images_per_s", "lr", "skipped_steps"))
        self.log(f"epoch {epoch + 1}/{cfg.optim.epochs} lr={train_stats['lr']:.4g} {terms} "
                 f"| {'WA ' if online is not None else ''}held-out ({self._held_out_label()}) "
                 f"clean {ev['clean']:.2f} PGD-{self.eval_threat.steps} {ev['pgd']:.2f}"
                 f"{' *best so far*' if improved else ''} | {train_stats['images_per_s']:.0f} img/s, "
                 f"{train_stats['seconds']:.0f} s + held-out eval {t_eval:.0f} s")

    def _summary(self) -> dict[str, Any]:
        cfg = self.cfg
        return {"run_dir": str(self.run_dir), "best_epoch": self.best["epoch"] + 1,
                "best_held_out_pgd": self.best["pgd"], "epochs": cfg.optim.epochs,
                "selection": self._selection(), "evaluated_model": self._evaluated_model(),
                "held_out": self._held_out_label(), "already_finished": self.finished}


def train(cfg: Config, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Convenience: ``Trainer(cfg, run_dir, **kwargs).fit()``."""
    return Trainer(cfg, run_dir, **kwargs).fit()

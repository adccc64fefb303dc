"""The trainer: one loop for every method (base objective + optional RPAT term).

Run directory layout::

    config.yaml     the resolved config
    meta.json       rpat version, git commit, torch version, device, start time
    metrics.jsonl   one JSON object per finished epoch
    last.pt         model + optimizer + progress, rewritten atomically after each epoch
    best.pt         weights with the highest held-out PGD accuracy so far
    final.pt        weights after the last epoch
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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..checkpoint import FORMAT, FORMAT_VERSION, atomic_save, load_checkpoint
from ..config import Config, config_from_dict, dump_yaml
from ..data import ArrayDataset, DeviceLoader, evaluation_subset, get_spec, load_dataset
from ..errors import InputError
from ..evaluation.robustness import accuracy, pgd_accuracy
from ..models import create_model
from ..objectives import RPATTerm, build_objective
from ..utils import derived_seed, git_commit, make_generator, resolve_device
from .schedules import lr_at

RUN_FILES = ("config.yaml", "meta.json", "metrics.jsonl", "last.pt", "best.pt", "final.pt")


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


def prepare_data(cfg: Config, train: ArrayDataset | None = None, test: ArrayDataset | None = None,
                 progress: bool = True) -> RunData:
    """Load (or take) the train/test sets, apply the fixed train subset, cut the held-out set."""
    d = cfg.data
    spec = get_spec(d.dataset)
    if train is None:
        train = load_dataset(d.dataset, d.root, "train", download=d.download, progress=progress)
    if test is None:
        test = load_dataset(d.dataset, d.root, "test", download=d.download, progress=progress)
    if d.train_subset is not None and d.train_subset < len(train):
        g = torch.Generator().manual_seed(derived_seed(0, 17))  # fixed subset, same for every seed
        idx = torch.randperm(len(train), generator=g)[: d.train_subset].sort().values
        train = train.subset(idx)
    held_out = evaluation_subset(d.dataset, test, cfg.eval.n_examples)
    mean = tuple(spec.mean) if cfg.model.normalize and spec.mean else None
    std = tuple(spec.std) if cfg.model.normalize and spec.std else None
    return RunData(train, held_out, len(train.classes), int(train.images.shape[1]),
                   spec.crop_padding, spec.flip, mean, std)


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
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.log = log
        resuming = check_run_dir(self.run_dir, resume, overwrite)
        ckpt = load_checkpoint(self.run_dir / "last.pt") if resuming else None
        if ckpt is not None:
            cfg = config_from_dict(ckpt["config"]).validate()  # a resumed run keeps its own config
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.data = data if data is not None else prepare_data(cfg, progress=progress)

        torch.manual_seed(derived_seed(cfg.seed, 0))
        self.model_kwargs = {"num_classes": self.data.num_classes, "in_chans": self.data.in_chans,
                             "mean": self.data.mean, "std": self.data.std}
        self.model = create_model(cfg.model.arch, **self.model_kwargs).to(self.device)
        o = cfg.optim
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=o.lr, momentum=o.momentum,
                                         weight_decay=o.weight_decay, nesterov=o.nesterov)
        r = cfg.rpat
        rpat = RPATTerm(r.lam, r.alpha, r.proxy, r.start_epoch) if r.enabled else None
        self.objective = build_objective(cfg.method.name, cfg.train_threat(), rpat)
        self.eval_threat = cfg.eval_threat()
        self.loader = DeviceLoader(self.data.train, cfg.data.batch_size, self.device, shuffle=True,
                                   augment=cfg.data.augment, padding=self.data.padding,
                                   flip=self.data.flip, seed=cfg.seed)
        held = self.data.held_out
        self.eval_x = held.images.float().div_(255)
        self.eval_y = held.labels

        self.start_epoch = 0
        self.best = {"pgd": -1.0, "epoch": -1}
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.start_epoch = int(ckpt["epoch"])
            self.best = dict(ckpt["best"])
            self._truncate_metrics(self.start_epoch)
            self.log(f"resuming {self.run_dir} at epoch {self.start_epoch + 1}/{cfg.optim.epochs}")
        else:
            self._write_run_files()

    # ---- bookkeeping -----------------------------------------------------------------
    def _write_run_files(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.yaml").write_text(dump_yaml(self.cfg))
        meta = {"rpat_version": __version__, "git_commit": git_commit(), "torch": torch.__version__,
                "python": platform.python_version(), "device": str(self.device),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "objective": self.objective.name,
                "threat": self.objective.method.threat.describe(),
                "train_images": len(self.data.train), "held_out_images": len(self.data.held_out)}
        (self.run_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")

    def _truncate_metrics(self, epoch: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["epoch"] < epoch]
        path.write_text("".join(ln + "\n" for ln in keep))

    def _weights(self, epoch: int, **extra: Any) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, "rpat_version": __version__,
                "arch": self.cfg.model.arch, "model_kwargs": self.model_kwargs,
                "model": self.model.state_dict(), "epoch": epoch, "config": self.cfg.to_dict(), **extra}

    def lr(self, epoch: int, fraction: float) -> float:
        o = self.cfg.optim
        return lr_at(o.schedule, o.lr, epoch, fraction, o.epochs, o.milestones, o.gamma)

    # ---- the loop --------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One epoch of adversarial training; returns the mean loss terms and throughput."""
        model, opt = self.model, self.optimizer
        model.train()
        self.loader.set_epoch(epoch)
        gen = make_generator(self.device, derived_seed(self.cfg.seed, epoch, 1))
        n_steps = len(self.loader)
        sums: dict[str, torch.Tensor] = {}
        seen = 0
        t0 = time.perf_counter()
        bar = tqdm(total=n_steps, desc=f"epoch {epoch + 1}/{self.cfg.optim.epochs}", unit="batch",
                   disable=not self.progress, leave=False, dynamic_ncols=True)
        for step, (x, y) in enumerate(self.loader):
            lr = self.lr(epoch, step / n_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            loss, terms = self.objective.step(model, x, y, epoch, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            b = y.shape[0]
            for k, v in terms.items():
                sums[k] = sums[k] + v * b if k in sums else v * b
            seen += b
            bar.update(1)
            if self.progress and ((step + 1) % self.cfg.log_interval == 0 or step + 1 == n_steps):
                means = self._means(sums, seen)  # one host sync per interval
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix({"img/s": f"{rate:.0f}", **{k: f"{v:.4f}" for k, v in means.items()}})
        bar.close()
        out = self._means(sums, seen)
        out["seconds"] = time.perf_counter() - t0
        out["images_per_s"] = seen / max(out["seconds"], 1e-9)
        out["lr"] = self.lr(epoch, 0.0)
        return out

    @staticmethod
    def _means(sums: dict[str, torch.Tensor], n: int) -> dict[str, float]:
        if not sums:
            return {}
        vals = (torch.stack(list(sums.values())) / n).tolist()
        return dict(zip(sums.keys(), vals, strict=True))

    def evaluate_held_out(self) -> dict[str, float]:
        """Clean and PGD accuracy (percent) on the held-out images, fixed attack seed."""
        bs = self.cfg.eval.batch_size
        clean = accuracy(self.model, self.eval_x, self.eval_y, batch_size=bs, device=self.device)
        robust = pgd_accuracy(self.model, self.eval_x, self.eval_y, self.eval_threat, batch_size=bs,
                              device=self.device, seed=derived_seed(self.cfg.seed, 2))
        return {"clean": clean, "pgd": robust}

    def fit(self) -> dict[str, Any]:
        """Train from the start (or the resumed epoch) to the end; returns a summary."""
        cfg = self.cfg
        for epoch in range(self.start_epoch, cfg.optim.epochs):
            train_stats = self.train_epoch(epoch)
            if not all(math.isfinite(v) for v in train_stats.values()):
                raise FloatingPointError(f"non-finite training loss in epoch {epoch + 1}: {train_stats}")
            ev = self.evaluate_held_out()
            improved = ev["pgd"] > self.best["pgd"]
            if improved:
                self.best = {"pgd": ev["pgd"], "clean": ev["clean"], "epoch": epoch}
                atomic_save(self._weights(epoch + 1, held_out=ev), self.run_dir / "best.pt")
            done = epoch + 1
            if cfg.save_every and done % cfg.save_every == 0:
                atomic_save(self._weights(done, held_out=ev), self.run_dir / "epochs" / f"epoch_{done:04d}.pt")
            atomic_save(self._weights(done, optimizer=self.optimizer.state_dict(), best=self.best),
                        self.run_dir / "last.pt")
            record = {"epoch": epoch, **{f"train_{k}": v for k, v in train_stats.items()},
                      "held_out_clean": ev["clean"], "held_out_pgd": ev["pgd"], "best": improved}
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            terms = " ".join(f"{k}={v:.4f}" for k, v in train_stats.items()
                             if k not in ("seconds", "images_per_s", "lr"))
            self.log(f"epoch {done}/{cfg.optim.epochs} lr={train_stats['lr']:.4g} {terms} "
                     f"| held-out clean {ev['clean']:.2f} PGD-{self.eval_threat.steps} {ev['pgd']:.2f}"
                     f"{' *best*' if improved else ''} | {train_stats['images_per_s']:.0f} img/s")
        atomic_save(self._weights(cfg.optim.epochs), self.run_dir / "final.pt")
        return {"run_dir": str(self.run_dir), "best_epoch": self.best["epoch"] + 1,
                "best_held_out_pgd": self.best["pgd"], "epochs": cfg.optim.epochs}


def train(cfg: Config, run_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Convenience: ``Trainer(cfg, run_dir, **kwargs).fit()``."""
    return Trainer(cfg, run_dir, **kwargs).fit()

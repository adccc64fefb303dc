"""The paper's two theorems (Appendix B) as measurements on held-out points.

For a perception proxy ``h`` (flattened to ``(B, K)``), held-out images ``x``
``(B, C, H, W)`` in [0, 1] and their PGD-20 perturbations ``Δ = x_adv − x``:

Theorem 1 (curvature along Δ):
    ``second_difference``: ``s = h(x+Δ) − 2·h(x+Δ/2) + h(x)``; ``4·s`` estimates
    ``ΔᵀHΔ`` (per output k, H the Hessian of h_k at x+Δ/2, error O(‖Δ‖⁴)).
    ``directional_second_derivative``: ``ΔᵀH(x+Δ/2)Δ`` exactly, forward-over-forward
    Jacobian-vector products (``torch.func.jvp`` twice), i.e. the Hessian-vector
    product ``HΔ`` contracted with Δ. The two agree for smooth models and small Δ.
    For piecewise-linear models (ReLU, max-pool) the Hessian is zero almost
    everywhere, so the HVP form is ~0 while the second difference measures the
    curvature hidden in the kinks crossed between x and x+Δ: there the second
    difference is the meaningful number (and it is what the RPAT term penalizes:
    at a = 1/2, ``h(x_mid) − (h(x) + h(x_adv))/2 = −s/2``).

Theorem 2 (Jacobian stability along the path):
    ``jacobian_drift``: ``‖J(x + aΔ) − J(x)‖_F`` for rates ``a``; exact (all K rows
    by vector-Jacobian products) when ``K ≤ exact_max_outputs``, otherwise an
    unbiased Hutchinson estimate of the squared Frobenius norm from random
    Gaussian output probes u (E‖uᵀM‖² = ‖M‖_F²).
    ``spectral_norm``: ``‖J(x)‖₂`` by power iteration on JᵀJ (JVP then VJP).
    The Lipschitz estimate on the sample is ``max_x ‖J(x)‖₂ + γ`` with
    ``γ = max ‖J(x+aΔ) − J(x)‖_F`` (Frobenius ≥ spectral, so it over-estimates γ).

Models run in eval mode (examples independent; batched VJPs/JVPs give
per-example Jacobians). By default the measurements run in float64 on the CPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp, vjp

from ..attacks.pgd import eval_mode
from ..errors import InputError
from ..models.base import PROXIES
from .common import attack_batches, held_out_images, load_for_analysis, summarize

Fn = Callable[[Tensor], Tensor]
ALPHAS: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
_TINY = 1e-30


def proxy_function(model: nn.Module, proxy: str = "logits") -> Fn:
    """``x (B, C, H, W) -> h(x) (B, K)``: the proxy flattened per example (logits: plain forward)."""
    if proxy not in PROXIES:
        raise InputError(f"unknown proxy {proxy!r}; valid: {', '.join(PROXIES)}")
    if proxy == "logits" or not hasattr(model, "forward_proxies"):
        if proxy != "logits":
            raise InputError(f"proxy {proxy!r} needs an rpat model with forward_proxies")
        return lambda x: model(x).flatten(1)
    return lambda x: model.forward_proxies(x)[proxy].flatten(1)


def second_difference(f: Fn, x: Tensor, delta: Tensor) -> Tensor:
    """``f(x+Δ) − 2 f(x+Δ/2) + f(x)``, ``(B, K)``; times 4 it estimates ``ΔᵀHΔ`` at x+Δ/2."""
    with torch.no_grad():
        b = x.shape[0]
        h = f(torch.cat([x, x + 0.5 * delta, x + delta]))
        return h[2 * b:] - 2 * h[b:2 * b] + h[:b]


def directional_second_derivative(f: Fn, x: Tensor, delta: Tensor, at: float = 0.5) -> Tensor:
    """``d²/dt² f(x + tΔ)`` at ``t = at``, i.e. ``ΔᵀH_kΔ`` per output k, ``(B, K)`` (forward-over-forward)."""
    point = x + at * delta

    def directional(p: Tensor) -> Tensor:
        return jvp(f, (p,), (delta,))[1]

    with torch.no_grad():
        return jvp(directional, (point,), (delta,))[1]


def jacobian_rows(f: Fn, x: Tensor) -> Tensor:
    """The per-example Jacobian ``(B, K, *x.shape[1:])``, one VJP per output row (small K only)."""
    out, pull = vjp(f, x)
    rows = []
    for k in range(out.shape[1]):
        u = torch.zeros_like(out)
        u[:, k] = 1
        rows.append(pull(u)[0])
    return torch.stack(rows, 1).detach()


def jacobian_drift(
    f: Fn, x: Tensor, delta: Tensor, alphas: Sequence[float] = ALPHAS, *, exact_max_outputs: int = 64,
    probes: int = 32, generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, bool]:
    """``‖J(x + aΔ) − J(x)‖_F`` for each rate ``a``, ``(B, len(alphas))``, and ``‖J(x)‖_F`` ``(B,)``.

    Exact with ``K ≤ exact_max_outputs`` outputs (K VJPs per point); otherwise the
    Hutchinson estimate from ``probes`` Gaussian output probes shared by all points
    on the path. Returns ``(drift, jac_frobenius, exact)``.
    """
    with torch.no_grad():
        k = f(x[:1]).shape[1]
    exact = k <= exact_max_outputs
    if exact:
        def apply(p: Tensor) -> Tensor:
            return jacobian_rows(f, p).flatten(2)  # (B, K, d)
    else:
        u = torch.randn((probes, x.shape[0], k), generator=generator, dtype=x.dtype, device="cpu").to(x.device)

        def apply(p: Tensor) -> Tensor:
            _, pull = vjp(f, p)
            return torch.stack([pull(u[i])[0].flatten(1) for i in range(probes)], 1).detach() / probes ** 0.5

    j0 = apply(x)
    drift = torch.stack([(apply(x + a * delta) - j0).flatten(1).norm(dim=1) for a in alphas], 1)
    return drift, j0.flatten(1).norm(dim=1), exact


def spectral_norm(f: Fn, x: Tensor, iters: int = 30, generator: torch.Generator | None = None) -> Tensor:
    """``‖J(x)‖₂`` per example ``(B,)`` by ``iters`` power iterations on JᵀJ (JVP, then VJP)."""
    v = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    v = v / v.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *[1] * (x.dim() - 1))
    _, pull = vjp(f, x)
    sigma = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    for _ in range(iters):
        with torch.no_grad():
            jv = jvp(f, (x,), (v,))[1]
        sigma = jv.norm(dim=1)
        w = pull(jv)[0].detach()
        v = w / w.flatten(1).norm(dim=1).clamp_min(_TINY).view(-1, *[1] * (x.dim() - 1))
    return sigma.detach()


def smoothness_of_model(
    model: nn.Module, x: Tensor, x_adv: Tensor, *, proxy: str = "logits", alphas: Sequence[float] = ALPHAS,
    power_iters: int = 30, exact_max_outputs: int = 64, probes: int = 32, batch_size: int = 50, seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, Any]:
    """All Theorem 1/2 measurements of ``model`` at ``x`` with ``Δ = x_adv − x`` (both ``(N, C, H, W)``).

    Returns a JSON-friendly dict: per-example summaries (:func:`summarize`) of
    ``curvature_fd`` = ‖4·s‖₂, ``curvature_hvp`` = ‖ΔᵀHΔ‖₂ (norms over the K
    outputs), their per-example ``relative_gap`` = ‖4s − ΔᵀHΔ‖/max(‖4s‖, ‖ΔᵀHΔ‖),
    ``nonlinearity`` = ‖s‖ / ‖h(x+Δ) − h(x)‖ (scale-free), the ``drift`` per rate and the
    scale-free ``relative_drift`` = drift / ‖J(x)‖_F, ``jac_frobenius``,
    ``spectral_norm``, and ``lipschitz_estimate`` = max ‖J(x)‖₂ + γ (γ = max drift).
    """
    gen = torch.Generator().manual_seed(seed)
    vals: dict[str, list[Tensor]] = {k: [] for k in ("fd", "hvp", "gap", "nonlin", "jf", "spec", "drift")}
    exact = True
    orig_dtype = next(model.parameters()).dtype
    model.to(dtype)
    try:
        with eval_mode(model):
            f = proxy_function(model, proxy)
            for i in range(0, x.shape[0], batch_size):
                xb = x[i:i + batch_size].to(dtype)
                db = x_adv[i:i + batch_size].to(dtype) - xb
                sd = second_difference(f, xb, db)
                q = directional_second_derivative(f, xb, db)
                fd, hv = (4 * sd).norm(dim=1), q.norm(dim=1)
                vals["fd"].append(fd)
                vals["hvp"].append(hv)
                vals["gap"].append((4 * sd - q).norm(dim=1) / torch.maximum(fd, hv).clamp_min(_TINY))
                with torch.no_grad():
                    span = (f(xb + db) - f(xb)).norm(dim=1)
                vals["nonlin"].append(sd.norm(dim=1) / span.clamp_min(_TINY))
                drift, jf, ex = jacobian_drift(f, xb, db, alphas, exact_max_outputs=exact_max_outputs,
                                               probes=probes, generator=gen)
                exact = exact and ex
                vals["drift"].append(drift)
                vals["jf"].append(jf)
                vals["spec"].append(spectral_norm(f, xb, power_iters, generator=gen))
    finally:
        model.to(orig_dtype)
    cat = {k: torch.cat(v) for k, v in vals.items()}
    gamma = float(cat["drift"].max())
    sup_j = float(cat["spec"].max())
    return {
        "proxy": proxy, "n_points": int(x.shape[0]), "dtype": str(dtype).removeprefix("torch."),
        "curvature_fd": summarize(cat["fd"]), "curvature_hvp": summarize(cat["hvp"]),
        "relative_gap": summarize(cat["gap"]), "nonlinearity": summarize(cat["nonlin"]),
        "drift": {f"{a:g}": summarize(cat["drift"][:, j]) for j, a in enumerate(alphas)},
        "relative_drift": {f"{a:g}": summarize(cat["drift"][:, j] / cat["jf"].clamp_min(_TINY))
                           for j, a in enumerate(alphas)},
        "drift_method": "exact (all output rows by VJPs)" if exact
        else f"Hutchinson estimate, {probes} Gaussian output probes",
        "jac_frobenius": summarize(cat["jf"]), "spectral_norm": summarize(cat["spec"]),
        "power_iters": power_iters, "gamma": gamma, "sup_spectral_norm": sup_j,
        "lipschitz_estimate": sup_j + gamma,
        "values": {"curvature_fd": cat["fd"].tolist(), "curvature_hvp": cat["hvp"].tolist(),
                   "spectral_norm": cat["spec"].tolist(),
                   "drift": {f"{a:g}": cat["drift"][:, j].tolist() for j, a in enumerate(alphas)}},
    }


def smoothness_of_checkpoint(
    path: str | Path, *, n_points: int = 100, proxy: str = "logits", alphas: Sequence[float] = ALPHAS,
    power_iters: int = 30, batch_size: int = 50, seed: int = 0, dtype: torch.dtype = torch.float64,
    dataset: str | None = None, data_root: str | None = None, label: str | None = None,
) -> dict[str, Any]:
    """:func:`smoothness_of_model` on ``n_points`` held-out images of an rpat checkpoint (CPU).

    Δ comes from PGD-20 under the checkpoint's threat model (float32, seeded by ``seed``).
    """
    model, ckpt, threat, ds, root = load_for_analysis(path, dataset=dataset, data_root=data_root)
    data = held_out_images(ds, root, n_points)
    t0 = time.perf_counter()
    x_adv, defended = attack_batches(model, data.x, data.y, threat, batch_size=250,
                                     device=torch.device("cpu"), seed=seed)
    res = smoothness_of_model(model, data.x, x_adv, proxy=proxy, alphas=alphas, power_iters=power_iters,
                              batch_size=batch_size, seed=seed, dtype=dtype)
    return {"label": label or Path(path).parent.name + "/" + Path(path).name, "checkpoint": str(path),
            "epoch": ckpt.get("epoch"), "arch": ckpt.get("arch"), "dataset": ds, "threat": threat.describe(),
            "robust_accuracy": 100.0 * float(defended.double().mean()), "seconds": time.perf_counter() - t0,
            **res}


def smoothness_table(results: Sequence[dict[str, Any]]) -> str:
    """A markdown table, one row per checkpoint: curvature, drift at a=1, ‖J‖₂, Lipschitz estimate."""
    def med(d: dict[str, Any]) -> str:
        return "-" if d["median"] is None else f"{d['median']:.4g}"

    head = ["checkpoint", "PGD-20 acc", "‖4s‖ median", "‖ΔᵀHΔ‖ median", "nonlinearity median",
            "drift a=1 median", "rel. drift a=1 median", "‖J‖₂ median", "sup ‖J‖₂", "γ", "Lipschitz est."]
    rows = []
    for r in results:
        last = list(r["drift"])[-1]
        rows.append([r["label"], f"{r['robust_accuracy']:.1f}", med(r["curvature_fd"]), med(r["curvature_hvp"]),
                     med(r["nonlinearity"]), med(r["drift"][last]), med(r["relative_drift"][last]),
                     med(r["spectral_norm"]),
                     f"{r['sup_spectral_norm']:.4g}", f"{r['gamma']:.4g}", f"{r['lipschitz_estimate']:.4g}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)

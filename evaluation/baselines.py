"""Training-free (or nearly) baselines scored exactly like FuseMix adapters: same latents, splits, metrics.

Each baseline is a model object with ``sides`` (media side first, e.g. ``("image", "text")``),
``encoders`` ({side: fusion.adapters.EncoderRef}) and ``embed(side, latents [B, d_side]) -> np.ndarray
[B, d_shared]`` float32 with L2-normalised rows, so `evaluation.retrieval.evaluate_model` scores it like
a fusion.adapters.FusedModel. A row whose shared-space vector is exactly zero (possible only in
degenerate cases, e.g. an ASIF latent with no positive similarity to any kept anchor) stays zero.

Methods (`BASELINES`):

- ``asif``: relative representations (Norelli et al. 2023, "ASIF: coupled data turns unimodal models to
  multimodal without training"). The training pairs (x_i, y_i) are anchors; a media latent is
  represented by its cosine similarities to the media anchors, a text latent by its similarities to the
  text anchors, so both live in the same n-dimensional anchor space. Per row: keep the top ``k``
  similarities (others 0), clamp negatives to 0, raise to ``exponent``, L2-normalise. With ``centre``
  each side's mean training latent is subtracted before the cosines. ``max_anchors`` (default all)
  keeps a seeded random subset of the training pairs as anchors, to bound memory and time.
- ``ridge``: a linear map with bias from the media latents to the text latents, ridge regression in
  closed form on the centred training pairs (the bias is not penalised):
  embed(media) = normalise(x W + b), embed(text) = normalise(y). ``alpha`` is RELATIVE: the penalty
  is alpha times the mean eigenvalue of the centred media Gram matrix (trace(Xc^T Xc) / dx), so one
  grid suits encoders of any scale; alpha = 0 is the minimum-norm least-squares map.
- ``procrustes``: each side centred and PCA-reduced to ``r`` dimensions on the training latents
  (optionally ``whiten``-ed: every component scaled to unit variance), rows L2-normalised, then the
  orthogonal R = U V^T from the SVD U S V^T of X^T Y (X, Y the reduced, normalised training latents)
  maps media onto text: embed(media) = normalise(pca_x(x) R), embed(text) = normalise(pca_y(y)).
- ``random``: a fusion.adapters.FusedModel with freshly initialised fusion.adapters.Adapter per side
  (``torch.manual_seed(seed)`` inside a forked RNG, so the caller's RNG state is untouched), never
  trained: the floor. The model wraps it (``.fused``) and returns numpy like the others.

Selection: `fit_baseline` picks the hyperparameters on the VALIDATION split only, by retrieval R-sum
(Recall@1 + @5 + @10 in both directions, as fractions, so at most 6) from `evaluation.retrieval`; the
first best in grid order wins ties. The grids (`GRIDS`) are

    asif:        k in (8, 32, 128, 512, "all") x exponent in (1, 4, 8) x centre in (False, True)
    ridge:       alpha in (1e-4, 1e-3, 1e-2, 1e-1, 1, 10, 100)
    procrustes:  r in (16, 32, 64, 128, 256, r_max) with r <= r_max = min(dx, dy, n_train)
                 x whiten in (False, True)
    random:      nothing to choose

(k values >= the number of anchors collapse into "all"). Keys given in ``params`` are fixed and
only the others are searched; without a validation split the others take `DEFAULTS`.

Files: `save_baseline` writes ``baseline.safetensors`` (numpy arrays, nothing pickled) and a
``config.json`` that fusion.checkpoint.read_config also reads (``format_version``, ``"kind":
"baseline"``, ``method``, ``params``, ``sides``, ``encoders``, ``extra``; ``adapter`` for random);
`load_baseline` checks ``expect`` like fusion.checkpoint.load_checkpoint. Cost of the ASIF search: each
grid point scores the validation split in the n-anchor space (n_val_items x n_val_texts x n per
direction); fix ``params`` or set ``max_anchors`` for very large splits.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from evaluation.retrieval import PairedSplit, retrieval_metrics
from fusion.adapters import Adapter, EncoderRef, FusedModel
from fusion.checkpoint import (
    CONFIG,
    FORMAT_VERSION,
    CheckpointMismatch,
    check_encoders,
    read_config,
    write_files,
)
from fusion.config import AdapterConfig, from_dict

BASELINES: tuple[str, ...] = ("asif", "ridge", "procrustes", "random")
WEIGHTS = "baseline.safetensors"
KIND = "baseline"
RSUM_KS: tuple[int, ...] = (1, 5, 10)

GRIDS: dict[str, dict[str, tuple]] = {
    "asif": {"k": (8, 32, 128, 512, "all"), "exponent": (1, 4, 8), "centre": (False, True)},
    "ridge": {"alpha": (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)},
    "procrustes": {"r": (16, 32, 64, 128, 256), "whiten": (False, True)},  # r_max is added per fit
    "random": {},
}
DEFAULTS: dict[str, dict[str, Any]] = {
    "asif": {"k": 128, "exponent": 8, "centre": True},
    "ridge": {"alpha": 1.0},
    "procrustes": {"r": 128, "whiten": False},  # r is capped at r_max
    "random": {},
}
# Fixed settings that are never searched.
EXTRA_PARAMS: dict[str, dict[str, Any]] = {"asif": {"max_anchors": None}}

_BLOCK_ELEMENTS = 2**22  # rows per embedding block: about this many float32 values of output


# ----------------------------------------------------------------------------------------------- helpers


def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their L2 norm; an all-zero row stays zero (no NaN)."""
    norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
    return x / torch.where(norms > 0, norms, torch.ones_like(norms))


def _f64(a: Any) -> torch.Tensor:
    """float64 tensor view of an array. The linear algebra runs in torch, not numpy: alternating numpy's
    BLAS threads with torch's (the retrieval scoring) makes both spin against each other on few cores."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _block_rows(width: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, width))


def _as_latents(latents: Any, dim: int, side: str) -> np.ndarray:
    if isinstance(latents, torch.Tensor):
        latents = latents.detach().cpu().numpy()
    x = np.asarray(latents)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(f"side {side!r} expects latents [B, {dim}], got shape {x.shape}")
    return x


def rsum(result: Any, ks: tuple[int, ...] = RSUM_KS) -> float:
    """R-sum of a RetrievalResult: sum of Recall@K over `ks` in both directions (fractions)."""
    return float(sum(result.t2i_recall[k] + result.i2t_recall[k] for k in ks))


def _val_rsum(
    item_emb: np.ndarray | torch.Tensor, text_emb: np.ndarray | torch.Tensor, val: PairedSplit
) -> float:
    res = retrieval_metrics(item_emb, text_emb, val.pair_items, val.pair_texts, ks=RSUM_KS, progress=False)
    return rsum(res)


class Baseline:
    """Common interface: ``sides``, ``encoders``, ``method``, ``params`` and ``embed``."""

    method: str = ""

    def __init__(self, sides: tuple[str, str], encoders: dict[str, EncoderRef], params: dict) -> None:
        self.sides = tuple(sides)
        self.encoders = dict(encoders)
        self.params = dict(params)

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def _embed(self, side_index: int, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def arrays(self) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def embed(self, side: str, latents: Any) -> np.ndarray:
        """[B, d_side] latents of `side` -> [B, dim] float32, L2-normalised rows."""
        if side not in self.sides:
            raise KeyError(f"unknown side {side!r}; this model has {list(self.sides)}")
        x = _as_latents(latents, self.encoders[side].dim, side)
        if len(x) == 0:
            return np.empty((0, self.dim), dtype=np.float32)
        return self._embed(self.sides.index(side), x)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sides={self.sides}, params={self.params})"


# ----------------------------------------------------------------------------------------------- ASIF


def _asif_cosines(x: np.ndarray, mean: np.ndarray, anchors_unit: torch.Tensor) -> torch.Tensor:
    """Cosines [B, n] of the (centred) latents x [B, d] with unit anchors [n, d]; float32."""
    z = _normalise_rows(torch.as_tensor(x, dtype=torch.float32) - torch.as_tensor(mean, dtype=torch.float32))
    return z @ anchors_unit.T


def _asif_sparsify(sims: torch.Tensor, k: int, exponent: float) -> torch.Tensor:
    """Top-k of each row kept (others 0), negatives clamped to 0, raised to `exponent`, L2-normalised."""
    n = sims.shape[1]
    if k < n:
        vals, idx = torch.topk(sims, k, dim=1)
        out = torch.zeros_like(sims).scatter_(1, idx, vals.clamp(min=0))
    else:
        out = sims.clamp(min=0)
    # Dividing by the row maximum first changes nothing after normalising, but keeps small
    # similarities raised to a high power from underflowing.
    top = out.amax(dim=1, keepdim=True)
    out = out / torch.where(top > 0, top, torch.ones_like(top))
    return _normalise_rows(out.pow_(exponent))


class AsifBaseline(Baseline):
    method = "asif"

    def __init__(self, sides, encoders, params, anchors_x, anchors_y, mean_x, mean_y) -> None:
        super().__init__(sides, encoders, params)
        self.anchors = (np.asarray(anchors_x, np.float32), np.asarray(anchors_y, np.float32))
        self.means = (np.asarray(mean_x, np.float32), np.asarray(mean_y, np.float32))
        self._unit = tuple(
            _normalise_rows(torch.from_numpy(a - m)) for a, m in zip(self.anchors, self.means, strict=True)
        )

    @property
    def n_anchors(self) -> int:
        return len(self.anchors[0])

    @property
    def dim(self) -> int:
        return self.n_anchors

    def _k(self) -> int:
        k = self.params["k"]
        return self.n_anchors if k == "all" else min(int(k), self.n_anchors)

    def _embed(self, i: int, x: np.ndarray) -> np.ndarray:
        n, k, p = self.n_anchors, self._k(), float(self.params["exponent"])
        out = np.empty((len(x), n), dtype=np.float32)
        step = _block_rows(n)
        with torch.no_grad():
            for s in range(0, len(x), step):
                sims = _asif_cosines(x[s : s + step], self.means[i], self._unit[i])
                out[s : s + step] = _asif_sparsify(sims, k, p).numpy()
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "anchors_x": self.anchors[0],
            "anchors_y": self.anchors[1],
            "mean_x": self.means[0],
            "mean_y": self.means[1],
        }

    @classmethod
    def from_arrays(cls, sides, encoders, params, arrays, adapter_cfg=None) -> AsifBaseline:
        return cls(
            sides,
            encoders,
            params,
            arrays["anchors_x"],
            arrays["anchors_y"],
            arrays["mean_x"],
            arrays["mean_y"],
        )


def _fit_asif(x, y, val, sides, encoders, seed, fixed, defaults_only):
    params = {**EXTRA_PARAMS["asif"], **{k: v for k, v in fixed.items() if k in EXTRA_PARAMS["asif"]}}
    if params["max_anchors"] is not None and params["max_anchors"] < len(x):
        keep = np.sort(np.random.default_rng(seed).choice(len(x), params["max_anchors"], replace=False))
        x, y = x[keep], y[keep]
    n = len(x)
    zeros = (np.zeros(x.shape[1], np.float32), np.zeros(y.shape[1], np.float32))
    means = (
        x.mean(axis=0, dtype=np.float64).astype(np.float32),
        y.mean(axis=0, dtype=np.float64).astype(np.float32),
    )

    def build(p: dict) -> AsifBaseline:
        mx, my = means if p["centre"] else zeros
        return AsifBaseline(sides, encoders, {**params, **p}, x, y, mx, my)

    grid = _grid("asif", fixed, defaults_only)
    # k values at or above the number of anchors all mean "all": keep one of them, in grid order.
    seen, points = set(), []
    for p in grid:
        eff = n if p["k"] == "all" else min(int(p["k"]), n)
        key = (eff, p["exponent"], p["centre"])
        if key not in seen:
            seen.add(key)
            points.append({**p, "k": "all" if eff == n else eff})
    if val is None:
        return build(points[0]), points[0], None, []
    # The cosines depend only on the centring: compute them once per setting, then sparsify per point.
    scored, cache = [], {}
    with torch.no_grad():
        for p in points:
            if p["centre"] not in cache:
                probe = build(p)
                cache[p["centre"]] = (
                    _asif_cosines(val.items, probe.means[0], probe._unit[0]),
                    _asif_cosines(val.texts, probe.means[1], probe._unit[1]),
                )
            si, st = cache[p["centre"]]
            eff = n if p["k"] == "all" else p["k"]
            e = float(p["exponent"])
            scored.append((p, _val_rsum(_asif_sparsify(si, eff, e), _asif_sparsify(st, eff, e), val)))
    best, score = _best(scored)
    return build(best), best, score, scored


# ----------------------------------------------------------------------------------------------- ridge


class RidgeBaseline(Baseline):
    method = "ridge"

    def __init__(self, sides, encoders, params, weight, bias) -> None:
        super().__init__(sides, encoders, params)
        self.weight = np.asarray(weight, np.float64)  # [dx, dy]
        self.bias = np.asarray(bias, np.float64)  # [dy]

    @property
    def dim(self) -> int:
        return self.weight.shape[1]

    def _embed(self, i: int, x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), self.dim), dtype=np.float32)
        step = _block_rows(max(x.shape[1], self.dim))
        w, b = _f64(self.weight), _f64(self.bias)
        for s in range(0, len(x), step):
            z = _f64(x[s : s + step])
            out[s : s + step] = _normalise_rows(z @ w + b if i == 0 else z).numpy()
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_arrays(cls, sides, encoders, params, arrays, adapter_cfg=None) -> RidgeBaseline:
        return cls(sides, encoders, params, arrays["weight"], arrays["bias"])


def ridge_solution(
    x: np.ndarray, y: np.ndarray, alphas: tuple[float, ...]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W [dx, dy], b [dy]) minimising ||Xc W - Yc||^2 + lam ||W||^2 per relative alpha, b = ȳ - x̄ W.

    lam = alpha * trace(Xc^T Xc) / dx. One thin SVD Xc = U S V^T serves every alpha:
    W = V diag(s / (s^2 + lam)) U^T Yc; at alpha = 0 singular values below rounding are dropped
    (the minimum-norm least-squares solution).
    """
    x64, y64 = _f64(x), _f64(y)
    mx, my = x64.mean(dim=0), y64.mean(dim=0)
    xc, yc = x64 - mx, y64 - my
    u, s, vt = torch.linalg.svd(xc, full_matrices=False)
    uty = u.T @ yc
    scale = float((s**2).sum()) / x64.shape[1]
    tol = (float(s.max()) if s.numel() else 0.0) * max(xc.shape) * float(np.finfo(np.float64).eps)
    keep = s > tol
    safe = torch.where(keep, s, torch.ones_like(s))
    out = []
    for alpha in alphas:
        lam = float(alpha) * scale
        coef = torch.where(keep, safe / (safe**2 + lam), torch.zeros_like(s))
        w = vt.T @ (coef[:, None] * uty)
        out.append((w.numpy(), (my - mx @ w).numpy()))
    return out


def _fit_ridge(x, y, val, sides, encoders, seed, fixed, defaults_only):
    points = _grid("ridge", fixed, defaults_only)
    fits = ridge_solution(x, y, tuple(p["alpha"] for p in points))
    models = [RidgeBaseline(sides, encoders, p, w, b) for p, (w, b) in zip(points, fits, strict=True)]
    if val is None:
        return models[0], points[0], None, []
    text_emb = models[0].embed(sides[1], val.texts)
    scored = [
        (p, _val_rsum(m.embed(sides[0], val.items), text_emb, val))
        for p, m in zip(points, models, strict=True)
    ]
    best, score = _best(scored)
    return models[points.index(best)], best, score, scored


# ----------------------------------------------------------------------------------------------- Procrustes


def orthogonal_procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The orthogonal R [d, d] minimising ||X R - Y||_F: R = U V^T from the SVD U S V^T of X^T Y."""
    u, _, vt = torch.linalg.svd(_f64(x).T @ _f64(y))
    return (u @ vt).numpy()


def _pca(z: np.ndarray, r_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean [d], components [d, r_max] (columns, by decreasing variance), std [r_max]) of z [n, d]."""
    z64 = _f64(z)
    mean = z64.mean(dim=0)
    _, s, vt = torch.linalg.svd(z64 - mean, full_matrices=False)
    std = s[:r_max] / math.sqrt(max(1, len(z64) - 1))
    return mean.numpy(), vt[:r_max].T.contiguous().numpy(), std.numpy()


class ProcrustesBaseline(Baseline):
    method = "procrustes"

    def __init__(self, sides, encoders, params, mean_x, proj_x, mean_y, proj_y, rotation) -> None:
        super().__init__(sides, encoders, params)
        # proj_* [d, r] already include the whitening when it is on: pca(z) = (z - mean) @ proj.
        self.means = (np.asarray(mean_x, np.float64), np.asarray(mean_y, np.float64))
        self.projs = (np.asarray(proj_x, np.float64), np.asarray(proj_y, np.float64))
        self.rotation = np.asarray(rotation, np.float64)

    @property
    def dim(self) -> int:
        return self.rotation.shape[1]

    def _reduce(self, i: int, z: np.ndarray) -> torch.Tensor:
        return _normalise_rows((_f64(z) - _f64(self.means[i])) @ _f64(self.projs[i]))

    def reduce(self, i: int, z: np.ndarray) -> np.ndarray:
        """pca of side i: centred, projected (and whitened), rows L2-normalised, float64 [B, r]."""
        return self._reduce(i, z).numpy()

    def _embed(self, i: int, x: np.ndarray) -> np.ndarray:
        out = np.empty((len(x), self.dim), dtype=np.float32)
        step = _block_rows(x.shape[1])
        rotation = _f64(self.rotation)
        for s in range(0, len(x), step):
            z = self._reduce(i, x[s : s + step])
            out[s : s + step] = _normalise_rows(z @ rotation if i == 0 else z).numpy()
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "mean_x": self.means[0],
            "proj_x": self.projs[0],
            "mean_y": self.means[1],
            "proj_y": self.projs[1],
            "rotation": self.rotation,
        }

    @classmethod
    def from_arrays(cls, sides, encoders, params, arrays, adapter_cfg=None) -> ProcrustesBaseline:
        a = arrays
        return cls(sides, encoders, params, a["mean_x"], a["proj_x"], a["mean_y"], a["proj_y"], a["rotation"])


def _fit_procrustes(x, y, val, sides, encoders, seed, fixed, defaults_only):
    r_max = min(x.shape[1], y.shape[1], len(x))
    if "r" in fixed and fixed["r"] > r_max:
        raise ValueError(f"procrustes r = {fixed['r']} exceeds min(dx, dy, n_train) = {r_max}")
    grid_r = tuple(sorted({r for r in GRIDS["procrustes"]["r"] if r <= r_max} | {r_max}))
    points = _grid("procrustes", fixed, defaults_only, overrides={"r": grid_r})
    points = [{**p, "r": min(p["r"], r_max)} for p in points]
    points = [p for i, p in enumerate(points) if p not in points[:i]]
    pcas = (_pca(x, r_max), _pca(y, r_max))

    def build(p: dict) -> ProcrustesBaseline:
        r, tail = p["r"], []
        for mean, comps, std in pcas:
            proj = comps[:, :r]
            if p["whiten"]:
                proj = proj / np.where(std[:r] > 0, std[:r], 1.0)
            tail += [mean, proj]
        probe = ProcrustesBaseline(sides, encoders, p, *tail, np.eye(r))
        rotation = orthogonal_procrustes(probe.reduce(0, x), probe.reduce(1, y))
        return ProcrustesBaseline(sides, encoders, p, *tail, rotation)

    if val is None:
        return build(points[0]), points[0], None, []
    scored, models = [], []
    for p in points:
        m = build(p)
        models.append(m)
        scored.append((p, _val_rsum(m.embed(sides[0], val.items), m.embed(sides[1], val.texts), val)))
    best, score = _best(scored)
    return models[points.index(best)], best, score, scored


# ----------------------------------------------------------------------------------------------- random


class RandomBaseline(Baseline):
    """Untrained adapters: ``fused`` is the fusion.adapters.FusedModel; embed returns numpy."""

    method = "random"

    def __init__(self, sides, encoders, params, fused: FusedModel, adapter_cfg: AdapterConfig) -> None:
        super().__init__(sides, encoders, params)
        self.fused = fused.eval()
        self.adapter_cfg = adapter_cfg

    @property
    def dim(self) -> int:
        return self.adapter_cfg.output_dim

    def _embed(self, i: int, x: np.ndarray) -> np.ndarray:
        return self.fused.embed(self.sides[i], np.asarray(x, np.float32)).numpy().astype(np.float32)

    def arrays(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.fused.state_dict().items()}

    @classmethod
    def build(cls, sides, encoders, params, adapter_cfg: AdapterConfig, seed: int | None) -> RandomBaseline:
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            adapters = {s: Adapter(encoders[s].dim, adapter_cfg) for s in sides}
            fused = FusedModel(adapters, {s: encoders[s] for s in sides})
        return cls(sides, encoders, params, fused, adapter_cfg)

    @classmethod
    def from_arrays(cls, sides, encoders, params, arrays, adapter_cfg=None) -> RandomBaseline:
        model = cls.build(sides, encoders, params, adapter_cfg, None)
        model.fused.load_state_dict({k: torch.from_numpy(v) for k, v in arrays.items()}, strict=True)
        model.fused.eval()
        return model


def _fit_random(x, y, val, sides, encoders, seed, fixed, defaults_only, adapter_cfg):
    model = RandomBaseline.build(sides, encoders, {"seed": int(seed)}, adapter_cfg or AdapterConfig(), seed)
    score = None
    if val is not None:
        score = _val_rsum(model.embed(sides[0], val.items), model.embed(sides[1], val.texts), val)
    return model, {}, score, []


_CLASSES: dict[str, type[Baseline]] = {
    "asif": AsifBaseline,
    "ridge": RidgeBaseline,
    "procrustes": ProcrustesBaseline,
    "random": RandomBaseline,
}


# ----------------------------------------------------------------------------------------------- selection


def _check_params(method: str, params: dict | None) -> dict:
    """Validated copy of `params` (fixed hyperparameters); ValueError naming the valid choices."""
    params = dict(params or {})
    valid = sorted(set(GRIDS[method]) | set(EXTRA_PARAMS.get(method, {})))
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown {method} params {unknown}; valid: {valid or 'none'}")

    def integer(v: Any) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    def number(v: Any) -> bool:
        return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)

    checks = {
        "k": (lambda v: v == "all" or (integer(v) and v >= 1), 'an integer >= 1 or "all"'),
        "exponent": (lambda v: number(v) and math.isfinite(v) and v > 0, "a finite number > 0"),
        "centre": (lambda v: isinstance(v, bool), "True or False"),
        "max_anchors": (lambda v: v is None or (integer(v) and v >= 1), "None or an integer >= 1"),
        "alpha": (lambda v: number(v) and math.isfinite(v) and v >= 0, "a finite number >= 0"),
        "r": (lambda v: integer(v) and v >= 1, "an integer >= 1"),
        "whiten": (lambda v: isinstance(v, bool), "True or False"),
    }
    for key, value in params.items():
        ok, what = checks[key]
        if not ok(value):
            raise ValueError(f"{method} param {key} must be {what}, got {value!r}")
        if integer(value):
            params[key] = int(value)
        elif number(value):
            params[key] = float(value)
    return params


def _grid(method: str, fixed: dict, defaults_only: bool, overrides: dict | None = None) -> list[dict]:
    """Grid points in order: fixed keys take their value, the others the grid (or the default)."""
    axes = {**GRIDS[method], **(overrides or {})}
    values = {
        key: (fixed[key],) if key in fixed else (DEFAULTS[method][key],) if defaults_only else axes[key]
        for key in axes
    }
    return [dict(zip(values, combo, strict=True)) for combo in itertools.product(*values.values())]


def _best(scored: list[tuple[dict, float]]) -> tuple[dict, float]:
    """First point with the highest score (grid order breaks ties)."""
    best_p, best_s = scored[0]
    for p, s in scored[1:]:
        if s > best_s:
            best_p, best_s = p, s
    return best_p, best_s


def _check_inputs(x_train, y_train, val, sides, encoders) -> tuple[np.ndarray, np.ndarray]:
    if len(sides) != 2 or not all(isinstance(s, str) and s for s in sides) or sides[0] == sides[1]:
        raise ValueError(f"sides must be two different non-empty names, got {sides!r}")
    if set(encoders) != set(sides):
        raise ValueError(f"encoders {sorted(encoders)} must name exactly the sides {list(sides)}")
    x, y = np.asarray(x_train), np.asarray(y_train)
    for name, a, side in (("x_train", x, sides[0]), ("y_train", y, sides[1])):
        if a.ndim != 2 or len(a) == 0:
            raise ValueError(f"{name} must be a non-empty 2-D [n, d] array, got shape {a.shape}")
        if a.shape[1] != encoders[side].dim:
            raise ValueError(
                f"{name} is {a.shape[1]}-d but encoder {encoders[side].name} gives {encoders[side].dim}-d"
            )
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    if len(x) != len(y):
        raise ValueError(f"x_train and y_train must be row-aligned, got {len(x)} and {len(y)} rows")
    if val is not None:
        for name, a, side in (("val.items", val.items, sides[0]), ("val.texts", val.texts, sides[1])):
            if np.shape(a)[1] != encoders[side].dim:
                raise ValueError(
                    f"{name} is {np.shape(a)[1]}-d, encoder {encoders[side].name} gives {encoders[side].dim}-d"
                )
            if not np.isfinite(a).all():
                raise ValueError(f"{name} contains NaN or inf")
        if len(val.pair_items) == 0:
            raise ValueError("the validation split has no pairs")
    # Floats keep their precision (ridge and Procrustes fit in float64, ASIF stores float32 anchors).
    return tuple(a if np.issubdtype(a.dtype, np.floating) else a.astype(np.float64) for a in (x, y))


def fit_baseline(
    method: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    *,
    val: PairedSplit | None,
    sides: tuple[str, str],
    encoders: dict[str, EncoderRef],
    seed: int = 0,
    params: dict | None = None,
    adapter_cfg: AdapterConfig | None = None,
) -> tuple[Baseline, dict]:
    """Fits one baseline on the training pairs (x_train [n, dx] media, y_train [n, dy] text, row-aligned).

    Hyperparameters not fixed by `params` are chosen on `val` by R-sum over the method's grid (`GRIDS`),
    or take `DEFAULTS` when `val` is None. Returns (model, info): info holds ``method``, the chosen
    hyperparameters (flat), ``val_rsum`` (None without val), ``selected_by`` ("val", "params" or
    "default") and ``grid`` (every searched point with its ``val_rsum``; empty when nothing was searched).
    `seed` picks the ASIF anchor subset (``max_anchors``) and the random adapters; `adapter_cfg` is
    used by ``random`` only (default AdapterConfig()). ValueError on an unknown method, unknown or bad
    params, or inconsistent shapes.
    """
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose one of {list(BASELINES)}")
    fixed = _check_params(method, params)
    sides = tuple(sides)
    x, y = _check_inputs(x_train, y_train, val, sides, encoders)
    searched = [k for k in GRIDS[method] if k not in fixed]
    defaults_only = val is None
    if method == "random":
        model, chosen, score, scored = _fit_random(
            x, y, val, sides, encoders, seed, fixed, defaults_only, adapter_cfg
        )
    else:
        fit = {"asif": _fit_asif, "ridge": _fit_ridge, "procrustes": _fit_procrustes}[method]
        model, chosen, score, scored = fit(x, y, val, sides, encoders, seed, fixed, defaults_only)
    # "params": nothing left to choose; "default": no validation split; "val": chosen on validation.
    selected_by = "params" if not searched or method == "random" else "default" if defaults_only else "val"
    info = {
        "method": method,
        **model.params,
        "val_rsum": score,
        "selected_by": selected_by,
        "grid": [{**p, "val_rsum": s} for p, s in scored] if len(scored) > 1 else [],
        "n_train": len(x),
    }
    return model, info


# ----------------------------------------------------------------------------------------------- files


def save_baseline(directory: str | Path, model: Baseline, extra: dict | None = None) -> Path:
    """Writes baseline.safetensors and config.json to `directory` (temporary names, then renamed)."""
    if not isinstance(model, Baseline) or model.method not in BASELINES:
        raise ValueError(f"not a baseline model: {type(model).__name__}")
    arrays = {k: np.ascontiguousarray(v) for k, v in model.arrays().items()}
    config = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "method": model.method,
        "params": model.params,
        "sides": list(model.sides),
        "encoders": {s: asdict(model.encoders[s]) for s in model.sides},
        "extra": extra or {},
    }
    if isinstance(model, RandomBaseline):
        config["adapter"] = asdict(model.adapter_cfg)
    return write_files(directory, WEIGHTS, lambda path: save_file(arrays, path), config)


def is_baseline(directory: str | Path) -> bool:
    """True when `directory` holds a config.json whose kind is "baseline"."""
    path = Path(directory) / CONFIG
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("kind") == KIND
    except (json.JSONDecodeError, AttributeError):
        return False


def load_baseline(directory: str | Path, expect: dict[str, EncoderRef] | None = None) -> Baseline:
    """Loads a saved baseline of any method; `expect` (side -> encoder of the latents to be fed) is checked
    like fusion.checkpoint.load_checkpoint: another dimension or fingerprint raises CheckpointMismatch."""
    config = read_config(directory)
    if config.get("kind") != KIND:
        raise CheckpointMismatch(
            f"{directory} is not a baseline (kind {config.get('kind')!r}); load adapters with "
            "fusion.checkpoint.load_checkpoint"
        )
    method = config.get("method")
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r} in {directory}; known: {list(BASELINES)}")
    sides = tuple(config["sides"])
    encoders = {s: EncoderRef(**config["encoders"][s]) for s in sides}
    check_encoders("baseline", config["sides"], encoders, expect)
    arrays = load_file(str(Path(directory) / WEIGHTS))
    adapter_cfg = from_dict(AdapterConfig, config["adapter"]) if method == "random" else None
    return _CLASSES[method].from_arrays(sides, encoders, dict(config["params"]), arrays, adapter_cfg)

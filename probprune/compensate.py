"""Forward-only compensation of a hard mask: refit the layers that read the pruned units.

For a linear sublayer output ``y = X W^T`` (o_proj reading the heads, down_proj reading the MLP
channels) and kept input columns S, the refit weight V minimises, over the calibration tokens,

    ||X W^T - X_S V^T||^2 + lambda ||V - W_S||^2,      V^T = (G_SS + lambda I)^-1 (G_S: W^T + lambda W_S^T)

with G = X^T X. The ridge term pulls V towards the bare slice W_S rather than towards zero, so
the refit's reconstruction error is never above the bare slice's for any lambda >= 0 (the slice is
a feasible point of the objective). ``lambda = damping * mean(diag(G_SS))`` (SparseGPT's relative
damping). With ``bias=True`` a bias c is fitted jointly (the least-squares form of FLAP's
mean-shift compensation): the same solve on the centred Gram, then c = W mu - V mu_S (the mean
target less V mu_S).

Two modes: ``parallel`` takes every layer's statistics from the dense model; ``sequential`` (as
SparseGPT and SlimGPT do) from the model whose earlier layers are already pruned and refit.
Either way the calibration hidden states stream through the model one layer at a time (one layer's
Gram matrix in memory at once), through the engine's own masked layers.

Two targets in the sequential mode. ``local``: what the dense sublayer would output on the pruned
model's own inputs, ``X W^T`` (SparseGPT's and SlimGPT's target). ``dense``: the dense model's
residual stream after the sublayer, less the pruned stream before it, ``T = h_dense' - h``, so the
refit also corrects the drift the earlier layers left in the residual stream (the dense stream
is carried along, one more copy of the hidden states). The solve is the same with ``G_S: W^T``
replaced by ``X_S^T T``; OBS then works on the full-column fit of T.

``correct_inputs`` (sequential): the projections that read each sublayer's input (q/k/v,
gate/up) are refit too, by one ridge least-squares map of the pruned stream's normed inputs onto
the dense stream's (:func:`input_map`; their kept rows become ``W M^T``), before the sublayer's
own refit.

``select="obs"``: each layer keeps as many MLP channels as the mask gives it, but which ones is
chosen from the Gram of down_proj's inputs (the stream's, so sequential statistics in the
sequential mode) by greedy structured Optimal Brain Surgeon (as SlimGPT does for columns):
repeatedly drop the channels whose removal, with the best update of the channels left, raises
the reconstruction error least, ``||W[:, j]||^2 / [H^-1]_jj``, in blocks of at most
``OBS_BLOCKS``-th of the removals (on the covariance when a bias is fitted, as the refit
then is). The search then decides how many channels each layer
keeps, the layer's own statistics which. The exported mask is the one the weights belong to
(:attr:`Compensation.mask`).

Gram matrices are accumulated in float64 from per-batch float32 products (at most ``batch_size *
seqlen`` terms each, relative error ~1e-6; ``tests/test_compensate.py`` measures it).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, List, Optional

import torch
from tqdm.auto import tqdm

import probprune_kernels as pk

from .forward import MaskedCausalLM
from .report import peak_memory_mib
from .settings.compensation import CompensationSettings

# the allowed values, as the settings define them
MODES, SELECT, TARGETS = (next(f.metadata["choices"] for f in fields(CompensationSettings)
                               if f.name == name)
                          for name in ("compensate", "compensate_select", "compensate_target"))
OBS_BLOCKS = 16  # removal rounds per layer of the OBS selection: ceil(removed / 16) channels each


class CompensationError(ValueError):
    """Settings with which compensation cannot run."""


def check_settings(mode: str, damping: float, windows: int, select: str = "mask",
                   target: str = "local", correct_inputs: bool = False) -> None:
    if mode not in MODES:
        raise CompensationError(f"compensation mode must be one of {MODES}, got {mode!r}")
    if target not in TARGETS:
        raise CompensationError(f"compensation target must be one of {TARGETS}, got {target!r}")
    if target == "dense" and mode == "parallel":
        raise CompensationError("the dense compensation target needs the sequential mode: in the "
                                "parallel mode the inputs are the dense model's, so the targets "
                                "are the local ones")
    if correct_inputs and mode != "sequential":
        raise CompensationError("the input correction needs the sequential mode: in the "
                                "parallel mode the inputs are the dense model's")
    if select not in SELECT:
        raise CompensationError(f"compensation channel selection must be one of {SELECT}, got "
                                f"{select!r}")
    if not damping >= 0:  # also catches NaN
        raise CompensationError(f"compensation damping must be >= 0, got {damping!r}")
    if windows < 1:
        raise CompensationError(f"compensation needs at least 1 calibration window, got {windows}")


class Gram:
    """Running X^T X, sum of rows and row count of a sublayer's inputs X [M, n]; with
    ``targets``, also X^T T, the sum of T and ||T||^2 of explicit targets T [M, targets]."""

    def __init__(self, n: int, device, targets: int = 0):
        f64 = dict(dtype=torch.float64, device=device)
        self.xtx = torch.zeros(n, n, **f64)
        self.xsum = torch.zeros(n, **f64)
        self.rows = 0
        self.xty = torch.zeros(n, targets, **f64) if targets else None
        self.ysum = torch.zeros(targets, **f64) if targets else None
        self.yty = torch.zeros((), **f64) if targets else None

    def add(self, x: torch.Tensor, t: Optional[torch.Tensor] = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx += (x.T @ x).double()
        self.xsum += x.sum(0).double()
        self.rows += x.shape[0]
        if self.xty is not None:
            t = t.reshape(-1, t.shape[-1]).float()
            self.xty += (x.T @ t).double()
            self.ysum += t.sum(0).double()
            self.yty += (t * t).sum().double()

    def moments(self, centred: bool):
        """(second moment [n, n], mean [n]) per row; centred: the covariance."""
        mean = self.xsum / self.rows
        second = self.xtx / self.rows
        return (second - torch.outer(mean, mean) if centred else second), mean

    def target_moments(self, W: torch.Tensor, centred: bool):
        """(E[x t^T] [n, out], E[t] [out], E[||t||^2]) per row, centred or not, of the explicit
        targets, or of the local ones t = W x when none were given."""
        C, mean = self.moments(centred)
        if self.xty is None:
            return C @ W.T, W @ mean, ((W @ C) * W).sum()
        tmean = self.ysum / self.rows
        cross, tt = self.xty / self.rows, self.yty / self.rows
        if centred:
            cross, tt = cross - torch.outer(mean, tmean), tt - tmean @ tmean
        return cross, tmean, tt


def refit(gram: Gram, weight: torch.Tensor, cols: torch.Tensor, damping: float,
          bias: bool) -> tuple:
    """(V [out, |S|] float64, c [out] float64 or None): the refit of ``weight`` [out, in] on its
    kept input columns ``cols`` (see the module docstring)."""
    W = weight.detach().double()
    C, mean = gram.moments(centred=bias)
    cross, tmean, _ = gram.target_moments(W, centred=bias)
    if cols.numel() == 0:
        V = W.new_zeros(W.shape[0], 0)
    else:
        C_SS = C[cols][:, cols]
        lam = damping * C_SS.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
        A = C_SS + lam * torch.eye(cols.numel(), dtype=C.dtype, device=C.device)
        B = cross[cols] + lam * W[:, cols].T
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            Vt = torch.cholesky_solve(B, L)
        else:  # singular without damping (kept inputs that are linearly dependent)
            Vt = torch.linalg.pinv(A, hermitian=True) @ B
        V = Vt.T
    c = tmean - V @ mean[cols] if bias else None
    return V, c


def relative_error(gram: Gram, weight: torch.Tensor, cols: torch.Tensor, V: torch.Tensor,
                   c: Optional[torch.Tensor]) -> float:
    """||T - (X_S V^T + c)||^2 / ||T||^2 over the rows the Gram saw (T: the targets, X W^T when
    local), from the Gram alone."""
    W, V = weight.detach().double(), V.double()
    C, mean = gram.moments(centred=False)
    cross, tmean, tt = gram.target_moments(W, centred=False)
    err = tt - 2 * (V * cross[cols].T).sum() + ((V @ C[cols][:, cols]) * V).sum()
    if c is not None:
        err = err - 2 * c @ (tmean - V @ mean[cols]) + c @ c
    # err is a difference of near-equal terms when the fit is exact: no negative rounding.
    return float(err.clamp_min(0) / tt.clamp_min(torch.finfo(torch.float64).tiny))


def obs_keep(gram: Gram, weight: torch.Tensor, n_keep: int, damping: float,
             centred: bool = False) -> torch.Tensor:
    """The ``n_keep`` input columns of ``weight`` [out, in] that greedy structured OBS keeps on
    the inputs' Gram (ascending, long); ``centred``: on their covariance, the objective of a
    refit that also fits a bias (a column whose input is near constant then costs nothing). Each
    round drops the block of columns with the smallest error increase ``||W[:, j]||^2 /
    [H^-1]_jj`` and applies the joint OBS update to the columns left: ``W -= W_R (H^-1_RR)^-1
    H^-1_R:``, ``H^-1 -= H^-1_:R (H^-1_RR)^-1 H^-1_R:``."""
    n = weight.shape[1]
    if not 0 <= n_keep <= n:
        raise CompensationError(f"cannot keep {n_keep} of {n} columns")
    H = gram.moments(centred=centred)[0].clone()
    lam = damping * H.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    H.diagonal().add_(lam if damping > 0 else 1e-8 * H.diagonal().mean())
    Hinv = torch.linalg.inv(H)
    W = weight.detach().double().clone()
    alive = torch.ones(n, dtype=torch.bool, device=W.device)
    remove = n - n_keep
    block = max(1, -(-remove // OBS_BLOCKS))
    while remove > 0:
        score = (W * W).sum(0) / Hinv.diagonal()
        score[~alive] = float("inf")
        R = torch.topk(score, min(block, remove), largest=False).indices
        inv_RR = torch.linalg.inv(Hinv[R][:, R])
        W -= (W[:, R] @ inv_RR) @ Hinv[R]
        Hinv -= (Hinv[:, R] @ inv_RR) @ Hinv[R]
        alive[R] = False
        W[:, R] = 0
        remove -= R.numel()
    return alive.nonzero().flatten()


@dataclass
class Compensation:
    """Refit weights in the export's form: state-dict key (original layer numbering) -> tensor of
    the kept columns only (``...o_proj.weight`` [d, kept heads' columns], ``...down_proj.weight``
    [d, kept channels], and ``.bias`` where one is fitted or the model has one)."""
    weights: Dict[str, torch.Tensor]
    mode: str
    damping: float
    bias: bool
    windows: int
    seconds: float
    peak_memory_mib: float     # the device's peak (CPU: the process's peak RSS)
    working_set_mib: float     # what compensation holds: the hidden states and one Gram matrix
    layers: List[dict] = field(default_factory=list)  # per kept layer: bare vs refit error
    mask: Optional[torch.Tensor] = None  # the model-unit mask the weights belong to
    select: str = "mask"
    target: str = "local"
    correct_inputs: bool = False
    # with keep_grams: state-dict prefix of each refit projection -> its inputs' second moment
    grams: Optional[Dict[str, torch.Tensor]] = None

    def summary(self) -> dict:
        def mean(key):
            vals = [r[key] for r in self.layers if key in r]
            return sum(vals) / len(vals) if vals else None
        return {"mode": self.mode, "select": self.select, "target": self.target,
                "correct_inputs": self.correct_inputs,
                "damping": self.damping,
                "bias": self.bias,
                "windows": self.windows, "seconds": self.seconds,
                "peak_memory_mib": self.peak_memory_mib,
                "working_set_mib": self.working_set_mib,
                "mean_relative_error": {k: mean(k) for k in
                                        ("attn_bare", "attn_refit", "mlp_bare", "mlp_refit",
                                         "attn_drift_left", "mlp_drift_left")},
                "layers": self.layers}


def _compact(mask: torch.Tensor, backend):
    """(idx, counts) of one unit mask [n], as the masked layers take them."""
    return pk.compact_masks(mask[None].to(torch.bool), backend=backend)


class _Stream:
    """The calibration hidden states [B, T, d] per batch, walked through the layers in place."""

    def __init__(self, engine: MaskedCausalLM, windows: torch.Tensor, batch_size: int,
                 dense: bool = False, dense_target: bool = False):
        family, model = engine.family, engine.model
        self.batches = [family.embed(model, windows[i:i + batch_size])
                        for i in range(0, windows.shape[0], batch_size)]
        # The dense model's stream beside the pruned one (the dense target, the input
        # correction), else None; dense_target: the refits match it.
        self.dense = [h.clone() for h in self.batches] if dense or dense_target else None
        self.dense_target = dense_target
        self.rotary = family.rotary(model, self.batches[0], engine.units.n_layers)

    def to(self, device: torch.device) -> None:
        """Moves the stream to the next layer's device (layer sharding)."""
        if self.batches[0].device != device:
            self.batches = [h.to(device) for h in self.batches]
            if self.dense is not None:
                self.dense = [h.to(device) for h in self.dense]

    def rotary_of(self, l: int, device: torch.device):
        """Layer ``l``'s (cos, sin) on ``device``."""
        return tuple(t.to(device) for t in self.rotary[l])


def _sublayer(stream: _Stream, inputs: Callable, kept_inputs: Callable, linear, cols,
              damping: float, bias: bool, fit: bool, sequential: bool, record: dict,
              name: str, weights: dict, prefix: str, obs: bool = False,
              grams: Optional[dict] = None,
              dense_inputs: Optional[Callable] = None,
              out: Optional[Callable] = None) -> torch.Tensor:
    """Statistics of one sublayer's input, its refit, and the stream moved past it (dense in the
    parallel mode, pruned and refit in the sequential one; the dense stream too, where the stream
    carries one). ``inputs(h)``: the sublayer's full input [M, n]; ``kept_inputs(h)``: its kept
    columns, in ``cols`` order. ``obs``: keep as many columns as ``cols`` holds, chosen by
    :func:`obs_keep`. ``dense_inputs``: the dense model's input function, where the pruned
    model's differs (the input correction). ``out``: the norm of the sublayer's output before it
    joins the residual stream (Gemma's), None where it joins as it is; the refit matches the
    output before that norm. Returns the kept columns."""
    W, b0 = linear.weight, linear.bias

    def joined(h, y):  # the stream past the sublayer whose output is y
        return h + y if out is None else h + out(y)

    def dense_output(x):
        y = x @ W.T
        return y if b0 is None else y + b0

    targets = stream.dense_target
    dense_inputs = dense_inputs or inputs
    gram = Gram(W.shape[1], W.device, W.shape[0] if targets else 0) if fit else None
    for i, h in enumerate(stream.batches):
        t = hd = None
        if stream.dense is not None:
            hd = joined(stream.dense[i], dense_output(dense_inputs(stream.dense[i])).view_as(h))
            stream.dense[i] = hd
        if targets:
            # The model's own bias stays in the export, so the refit's share excludes it.
            t = (hd - h).reshape(-1, h.shape[-1]) - (0 if b0 is None else b0)
        if sequential and not fit:
            continue  # a dropped layer: only the dense stream moves
        x = inputs(h)
        if fit:
            gram.add(x, t)
        if not sequential:  # the dense stream
            stream.batches[i] = joined(h, dense_output(x).view_as(h))
    if not fit:
        return cols
    if grams is not None:
        grams[prefix] = gram.moments(centred=False)[0].float()
    if obs:
        # OBS prunes the best full-column fit of the targets: W itself when they are local.
        full = torch.arange(W.shape[1], device=W.device)
        fitted = refit(gram, W, full, damping, False)[0] if targets else W
        cols = obs_keep(gram, fitted, cols.numel(), damping, centred=bias)
        kept_inputs = lambda h: inputs(h)[:, cols]  # noqa: E731
    V, c = refit(gram, W, cols, damping, bias)
    record[name + "_bare"] = relative_error(gram, W, cols, W[:, cols].double(), None)
    record[name + "_refit"] = relative_error(gram, W, cols, V, c)
    V = V.to(W.dtype)
    if b0 is not None:  # the model's own bias stays; the fitted shift adds to it
        c = b0.double() if c is None else c + b0.double()
    c = None if c is None else c.to(W.dtype)
    weights[prefix + ".weight"] = V.cpu()
    if c is not None:
        weights[prefix + ".bias"] = c.cpu()
    if sequential:
        for i, h in enumerate(stream.batches):
            y = torch.zeros_like(h)
            if cols.numel():
                # The compact layout pads to the capacity with zero columns after the kept ones.
                y = y + (kept_inputs(h)[:, :cols.numel()] @ V.T).view_as(h)
            if out is not None:
                stream.batches[i] = joined(h, y if c is None else y + c)
            else:
                stream.batches[i] = h + y if c is None else h + y + c
    return cols


@torch.no_grad()
def compensate(engine: MaskedCausalLM, mask: torch.Tensor, windows: torch.Tensor,
               settings: CompensationSettings = CompensationSettings(), *,
               batch_size: int = 8, progress: bool = True,
               keep_grams: bool = False) -> Compensation:
    """Refits o_proj and down_proj of every kept layer for the hard model-unit ``mask`` on the
    calibration ``windows`` [N, T] by ``settings`` (a run's config will do; all of ``windows``
    are used); returns the refit weights (the model is not changed) and, with
    ``compensate_select="obs"``, the mask of the MLP channels chosen by OBS. ``keep_grams``:
    also the second moment of each refit projection's inputs (float32; all layers' at once).
    ``compensate_inputs`` (sequential): also refit q/k/v and gate/up by :func:`input_map`."""
    mode, damping, bias = settings.compensate, settings.compensate_damping, settings.fits_bias
    select, target = settings.compensate_select, settings.compensate_target
    correct_inputs = settings.compensate_inputs
    check_settings(mode, damping, windows.shape[0] if windows.dim() == 2 else 0, select, target,
                   correct_inputs)
    if mode == "none":
        raise CompensationError("compensate() called with mode 'none'")
    if windows.dim() != 2:
        raise CompensationError(f"calibration windows must be [N, T] token ids, got "
                                f"{tuple(windows.shape)}")
    units, shape, be = engine.units, engine.units.shape, engine.backend
    if target == "dense" and engine.layers[0].attn_out_norm is not None:
        raise CompensationError(
            f"the dense compensation target needs blocks that add their output to the residual "
            f"stream as it is; {engine.family.name} norms it first, so its refits match the "
            f"local targets (--compensate-target local)")
    if mask.shape != (units.n_units,):
        raise CompensationError(f"mask must be one hard model-unit mask [{units.n_units}], got "
                                f"{tuple(mask.shape)}")
    device = engine.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    flat = mask.to(device=device, dtype=torch.bool, copy=True)  # the OBS selection edits it
    m = units.split(flat)
    sequential = mode == "sequential"
    stream = _Stream(engine, windows, batch_size, dense=correct_inputs,
                     dense_target=target == "dense")
    all_kept = {}  # device -> the all-kept compact index lists of heads and channels
    weights: Dict[str, torch.Tensor] = {}
    grams: Optional[Dict[str, torch.Tensor]] = {} if keep_grams else None
    records: List[dict] = []
    for l in tqdm(range(units.n_layers), desc=f"compensation ({mode})", disable=not progress,
                  unit="layer", leave=False):
        layer, dev = engine.layers[l], engine.layer_devices[l]
        keep = bool(m.layers[l])
        if not keep and sequential and stream.dense is None:
            continue  # a dropped layer: the residual passes through
        stream.to(dev)
        cos, sin = stream.rotary_of(l, dev)
        attn, mlp = layer.self_attn, layer.mlp
        query_heads = units.query_kept(m.heads[l]).nonzero().flatten().to(dev)
        channels = m.mlp[l].nonzero().flatten().to(dev)
        kept_h = attn.head_lists(m.heads[l][None].to(dev))
        kept_c = _compact(m.mlp[l].to(dev), be)
        if dev not in all_kept:  # once per device, not per layer
            all_kept[dev] = (attn.head_lists(torch.ones(1, attn.n_units, dtype=torch.bool,
                                                        device=dev)),
                             _compact(torch.ones(shape.intermediate, device=dev), be))
        all_heads, all_channels = all_kept[dev]
        record = {"layer": l}
        fix = correct_inputs and keep

        def attn_inputs(h, lists=all_heads, M=None):
            x = layer.attn_norm(h)
            return attn.head_outputs((x if M is None else x @ M)[None], cos, sin, lists)[0]

        def mlp_inputs(h, idx=all_channels, M=None):
            x = layer.mlp_norm(h)
            return mlp.channel_outputs((x if M is None else x @ M)[None], *idx)[0]

        M = input_map(stream, layer.attn_norm, damping, record, "attn") if fix else None
        _sublayer(stream, lambda h: attn_inputs(h, M=M), lambda h: attn_inputs(h, kept_h, M),
                  attn.o_proj, shape.query_columns(query_heads), damping, bias, keep, sequential,
                  record, "attn", weights, engine.key(l, "o"), grams=grams,
                  dense_inputs=attn_inputs, out=layer.attn_out_norm)
        if fix:
            kv = units.kv_kept(m.heads[l]).nonzero().flatten().to(dev)
            kv_rows = (kv[:, None] * shape.head_dim + torch.arange(shape.head_dim, device=dev))
            for role, rows in (("q", shape.query_columns(query_heads)),
                               ("k", kv_rows.flatten()), ("v", kv_rows.flatten())):
                _store_mapped(weights, engine.key(l, role), getattr(attn, f"{role}_proj"), rows,
                              M)
        M = (input_map(stream, layer.mlp_norm, damping, record, "mlp") if fix
             else None)
        chosen = _sublayer(stream, lambda h: mlp_inputs(h, M=M),
                           lambda h: mlp_inputs(h, kept_c, M), mlp.down_proj,
                           channels, damping, bias, keep, sequential, record, "mlp", weights,
                           engine.key(l, "down"), obs=select == "obs" and keep,
                           grams=grams, dense_inputs=mlp_inputs, out=layer.mlp_out_norm)
        if fix:
            for role in ("gate", "up"):
                _store_mapped(weights, engine.key(l, role), getattr(mlp, f"{role}_proj"), chosen,
                              M)
        if keep:
            m.mlp[l] = False
            m.mlp[l, chosen.to(flat.device)] = True
            records.append(record)
    seconds = time.perf_counter() - t0
    stream_bytes = sum(h.numel() * h.element_size() for h in stream.batches) * (
        1 if stream.dense is None else 2)
    gram_bytes = 8 * max(shape.intermediate, shape.n_kv_heads * shape.q_per_kv * shape.head_dim) ** 2
    return Compensation(weights, mode, damping, bias, windows.shape[0], seconds,
                        peak_memory_mib(device), (stream_bytes + gram_bytes) / 2**20, records,
                        flat.cpu(), select, target, correct_inputs, grams)


def input_map(stream: _Stream, norm, damping: float, record: dict, name: str) -> torch.Tensor:
    """M [d, d]: the ridge least-squares map of the pruned stream's normed sublayer inputs onto
    the dense stream's, ``x_dense ~ x_pruned M`` over the calibration tokens, pulled towards the
    identity: ``M = (G_pp + lambda I)^-1 (G_pd + lambda I)``. The sublayer's input projections
    then read ``x M``, i.e. their weights become ``W M^T``: they see what the dense model's
    inputs would have been, as far as a linear map of the pruned ones can tell. Records the share
    of the input drift ``||x_pruned - x_dense||^2`` left, ``<name>_drift_left``."""
    d = stream.batches[0].shape[-1]
    f64 = dict(dtype=torch.float64, device=stream.batches[0].device)
    pp, pd = torch.zeros(d, d, **f64), torch.zeros(d, d, **f64)
    dd, before = torch.zeros((), **f64), torch.zeros((), **f64)
    for h, hd in zip(stream.batches, stream.dense):
        xp, xd = norm(h).reshape(-1, d).float(), norm(hd).reshape(-1, d).float()
        pp += (xp.T @ xp).double()
        pd += (xp.T @ xd).double()
        dd += (xd * xd).sum().double()
        before += ((xp - xd) ** 2).sum().double()  # directly: exactly 0 without drift
    eye = torch.eye(d, **f64)
    lam = damping * pp.diagonal().mean().clamp_min(torch.finfo(torch.float64).tiny)
    M = torch.linalg.solve(pp + lam * eye, pd + lam * eye)
    after = dd - 2 * (M * pd).sum() + ((pp @ M) * M).sum()
    # No drift (the first layer reads the embeddings in both models): none is left either.
    record[name + "_drift_left"] = float(after.clamp_min(0) / before) if before > 0 else 0.0
    return M.to(stream.batches[0].dtype)


def _store_mapped(weights: dict, prefix: str, linear, rows: torch.Tensor,
                  M: torch.Tensor) -> None:
    """The export's kept rows of an input projection that reads ``x M``: ``W[rows] M^T``."""
    W = linear.weight
    weights[prefix + ".weight"] = (W[rows].double() @ M.double().T).to(W.dtype).cpu()


def input_grams(engine: MaskedCausalLM, windows: torch.Tensor, batch_size: int = 8,
                progress: bool = True) -> Dict[str, torch.Tensor]:
    """The dense model's second moments of every o_proj's and down_proj's inputs on ``windows``
    (the parallel mode's statistics), by state-dict prefix: what
    :meth:`MaskedCausalLM.use_refits` scores masks with."""
    every = torch.ones(engine.units.n_units, dtype=torch.bool, device=engine.device)
    plain = CompensationSettings(compensate="parallel", compensate_bias=False,
                                 compensate_select="mask")
    return compensate(engine, every, windows, plain, batch_size=batch_size,
                      progress=progress, keep_grams=True).grams

"""The parameter budget: which units share a budget, projection of probabilities onto it, and the
final hard mask.

Budget groups: ``global`` puts every unit in one group; ``per-type`` gives heads and channels
their own budgets (the paper's separate attention and MLP ratios); ``scope="layer"`` splits each of
those by layer. ``shape="uniform"`` gives every layer the same two budgets (a number of KV groups
and a number of MLP channels), so the pruned layers all have one shape: the export is then the
plain architecture, which serving engines load (:func:`probprune.export.plain_config`). The projection is the one of DESIGN.md: a shift ``v`` per group, found by
bisection, with ``s_u <- clamp(s_u - v, lo_u, hi_u)`` and ``sum_u w_u s_u = B``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

from .units import ModelShape, UnitSpace

BISECTION_STEPS = 60
SHAPES = ("free", "uniform")


class BudgetError(ValueError):
    pass


@dataclass
class Budget:
    space: UnitSpace         # the search units; the budget uses their structure, never their order
    group_of: torch.Tensor   # [n_units] long, budget group of each unit
    targets: torch.Tensor    # [n_groups] float64, kept parameters asked of each group
    lo: torch.Tensor         # [n_units] lower bound of each probability (1 for protected units)
    hi: torch.Tensor         # [n_units]
    names: List[str]
    mode: str = "global"      # "global" or "per-type"
    ratios: Optional[dict] = None  # sparsity asked of each unit type ("heads", "mlp", "layers")

    @property
    def shape(self) -> ModelShape:
        return self.space.shape

    @property
    def total_target(self) -> float:
        return float(self.targets.sum())

    @classmethod
    def build(cls, space: UnitSpace, sparsity: Optional[float] = None, mode: str = "global",
              scope: str = "global", attn_sparsity: Optional[float] = None,
              mlp_sparsity: Optional[float] = None, protect_layers=(),
              shape: str = "free") -> "Budget":
        """``space``: the search units. ``sparsity``: the fraction of prunable parameters to
        remove, in (0, 1). ``shape="uniform"``: see :meth:`uniform`."""
        if shape not in SHAPES:
            raise BudgetError(f"shape must be one of {', '.join(SHAPES)}, got {shape!r}")
        if shape == "uniform":
            if (mode, scope, mlp_sparsity, tuple(protect_layers)) != ("global", "global", None, ()):
                raise BudgetError("a uniform shape is its own allocation: it takes no per-type "
                                  "budget, layer scope, MLP ratio or protected layers")
            return cls.uniform(space, sparsity, attn_sparsity or 0.0)
        ratios = {"heads": attn_sparsity if attn_sparsity is not None else sparsity,
                  "mlp": mlp_sparsity if mlp_sparsity is not None else sparsity,
                  "layers": sparsity}
        for name, r in ratios.items():
            if r is None and (name != "layers" or space.include_layers):
                raise BudgetError("a sparsity is required")
            if r is not None and not 0.0 < r < 1.0:
                raise BudgetError(f"sparsity must lie strictly between 0 and 1, got {r}")
        if mode not in ("global", "per-type"):
            raise BudgetError(f"budget must be 'global' or 'per-type', got {mode!r}")
        if scope not in ("global", "layer"):
            raise BudgetError(f"scope must be 'global' or 'layer', got {scope!r}")
        if space.include_layers and (mode != "global" or scope != "global"):
            raise BudgetError("pruning whole layers needs --budget global --scope global: a layer "
                              "unit removes its heads and channels too, so it cannot share a "
                              "per-type or per-layer budget")
        for l in protect_layers:
            if not 0 <= l < space.n_layers:
                raise BudgetError(f"protected layer {l} does not exist (model has "
                                  f"{space.n_layers} layers)")

        types = space.type_slices()
        unit_layer = space.unit_layer()
        costs = space.costs()
        type_of = torch.empty(space.n_units, dtype=torch.long)
        for i, sl in enumerate(types.values()):
            type_of[sl] = i
        type_names = list(types)
        if mode == "global":
            key = torch.zeros_like(type_of)
        else:
            key = type_of
        if scope == "layer":
            key = key * space.n_layers + unit_layer
        uniq, group_of = torch.unique(key, return_inverse=True)

        lo = torch.zeros(space.n_units, dtype=torch.float64)
        hi = torch.ones(space.n_units, dtype=torch.float64)
        for l in protect_layers:
            lo[unit_layer == l] = 1.0

        # Full size of each group (with every unit kept) and its ratio.
        full = torch.zeros(len(uniq), dtype=torch.float64)
        if space.include_layers:
            full[0] = space.prunable_params
        else:
            full.scatter_add_(0, group_of, costs)
            if space.query_heads:  # every KV group's key/value heads, in its query heads' group
                kv_group = group_of[types["heads"]].view(-1, space.shape.q_per_kv)[:, 0]
                full.scatter_add_(0, kv_group, torch.full(kv_group.shape, float(
                    space.shape.kv_cost), dtype=torch.float64))
        names, targets = [], torch.zeros_like(full)
        for g, k in enumerate(uniq.tolist()):
            t = type_names[k % len(type_names) if scope == "global" else k // space.n_layers] \
                if mode == "per-type" else "all"
            layer = f" layer {k % space.n_layers}" if scope == "layer" else ""
            ratio = sparsity if t == "all" else ratios[t]
            targets[g] = (1.0 - ratio) * full[g]
            names.append(f"{t}{layer}")
        budget = cls(space, group_of, targets, lo, hi, names, mode, ratios)
        budget._check_feasible()
        return budget

    @classmethod
    def uniform(cls, space: UnitSpace, sparsity: float, attn_sparsity: float = 0.0) -> "Budget":
        """Every layer keeps ``round((1 - attn_sparsity) * n_kv_heads)`` KV groups and as many
        MLP channels as the rest of its share of the budget pays for: one budget per layer and
        unit type, equal across layers. All units of a group cost the same, so the hard mask
        keeps the same count in every layer."""
        sh = space.shape
        if not 0.0 < sparsity < 1.0:
            raise BudgetError(f"sparsity must lie strictly between 0 and 1, got {sparsity}")
        if space.include_layers or space.query_heads:
            raise BudgetError("a uniform shape keeps every layer and prunes whole KV groups: it "
                              "takes neither layer units nor query-head units")
        if sh.intermediate % space.channel_block:
            raise BudgetError(f"a uniform shape needs MLP blocks of one size: the channel block "
                              f"{space.channel_block} does not divide the {sh.intermediate} MLP "
                              f"channels of a layer")
        heads = sh.n_kv_heads - round(attn_sparsity * sh.n_kv_heads)
        if heads < 1:
            raise BudgetError(f"attention sparsity {attn_sparsity} leaves no KV group of the "
                              f"{sh.n_kv_heads} in a layer")
        per_layer = (1.0 - sparsity) * space.prunable_params / sh.n_layers
        mlp = per_layer - heads * sh.head_cost
        block = space.channel_block * sh.channel_cost
        if mlp < block:
            raise BudgetError(f"sparsity {sparsity} with {heads} of {sh.n_kv_heads} KV groups "
                              f"kept per layer leaves a layer's MLP less than one block of "
                              f"{space.channel_block} channels")
        # Group of each unit: (type, layer); the targets sit half a unit above the counts kept
        # (or at all of them), so rounding never drops one.
        type_of = torch.zeros(space.n_units, dtype=torch.long)
        type_of[space.type_slices()["mlp"]] = 1
        group_of = type_of * sh.n_layers + space.unit_layer()
        blocks = int(mlp // block)
        targets = torch.tensor(
            [min(heads + 0.5, sh.n_kv_heads) * sh.head_cost] * sh.n_layers
            + [min(blocks + 0.5, space.blocks_per_layer) * block] * sh.n_layers,
            dtype=torch.float64)
        names = [f"{t} layer {l}" for t in ("heads", "mlp") for l in range(sh.n_layers)]
        ratios = {"heads": 1.0 - heads / sh.n_kv_heads, "mlp": 1.0 - blocks * space.channel_block
                  / sh.intermediate, "layers": None}
        return cls(space, group_of, targets, torch.zeros(space.n_units, dtype=torch.float64),
                   torch.ones(space.n_units, dtype=torch.float64), names, "uniform", ratios)

    # ------------------------------------------------------------------------------------------
    def kept_by_group(self, values: torch.Tensor,
                      costs: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Kept parameters of each group under a hard mask, or expected under probabilities.
        With layer units (one global group) this is the exact product form, which is still
        non-increasing in the projection shift, so bisection applies."""
        values = values.double()
        if self.space.include_layers:
            return self.space.kept_params(values).reshape(1)
        if costs is None:
            costs = self.space.costs().to(values.device)
        out = torch.zeros(len(self.targets), dtype=torch.float64, device=values.device)
        out.scatter_add_(0, self.group_of.to(values.device), costs * values)
        if self.space.query_heads:
            kv = self.space.kv_kept(self.space.split(values).heads).flatten()
            out.scatter_add_(0, self._kv_group.to(values.device), kv * self.shape.kv_cost)
        return out

    @property
    def _kv_group(self) -> torch.Tensor:
        """Budget group of each KV group [L * Hkv] (its query heads' group; query-head units)."""
        heads = self.group_of[self.space.type_slices()["heads"]]
        return heads.view(-1, self.shape.q_per_kv)[:, 0]

    def _check_feasible(self) -> None:
        minimum = self.kept_by_group(self.lo)
        bad = (minimum > self.targets + 0.5).nonzero().flatten().tolist()
        if bad:
            g = bad[0]
            raise BudgetError(
                f"the budget cannot be met: in group '{self.names[g]}' the protected units alone "
                f"keep {minimum[g]:,.0f} parameters, more than the {self.targets[g]:,.0f} allowed")

    def project(self, probs: torch.Tensor) -> torch.Tensor:
        """Shifts each group's probabilities by one ``v`` so its expected kept parameters meet
        the target, within [lo, hi]. Bisection for all groups at once."""
        device = probs.device
        s = probs.double()
        lo, hi = self.lo.to(device), self.hi.to(device)
        gid = self.group_of.to(device)
        targets = self.targets.to(device)
        costs = self.space.costs().to(device)  # once, not in each of the bisection steps
        n = len(targets)
        v_lo = torch.full((n,), -1.0, dtype=torch.float64, device=device)  # f(v_lo) = max
        v_hi = torch.full((n,), 1.0, dtype=torch.float64, device=device)   # f(v_hi) = min
        for _ in range(BISECTION_STEPS):
            v = 0.5 * (v_lo + v_hi)
            kept = self.kept_by_group(torch.clamp(s - v[gid], lo, hi), costs)
            too_much = kept > targets
            v_lo = torch.where(too_much, v, v_lo)
            v_hi = torch.where(too_much, v_hi, v)
        v = 0.5 * (v_lo + v_hi)
        return torch.clamp(s - v[gid], lo, hi).to(probs.dtype)

    # ------------------------------------------------------------------------------------------
    def hard_mask(self, probs: torch.Tensor) -> torch.Tensor:
        """The units with the highest probabilities that fit each group's budget: kept
        parameters <= target and the slack smaller than the cost of any unit left out.

        With layer units, a layer is kept when its probability is at least 0.5 (or it is
        protected); its heads and channels then compete for what the kept layers leave.
        """
        space = self.space
        s = probs.detach().double().cpu()
        costs = space.costs()
        keep = torch.zeros(space.n_units, dtype=torch.bool)
        keep |= self.lo >= 1.0
        budgets = self.targets.clone()
        candidates = torch.ones(space.n_units, dtype=torch.bool)
        if space.include_layers:
            sl = space.type_slices()["layers"]
            layer_keep = (s[sl] >= 0.5) | (self.lo[sl] >= 1.0)
            keep[sl] = layer_keep
            # Units of dropped layers cannot be kept; kept layers pay their fixed part first.
            candidates &= layer_keep[space.unit_layer()]
            candidates[sl] = False
            budgets[0] -= layer_keep.double().sum() * space.shape.layer_fixed_cost
            costs[sl] = 0.0  # already paid above
        candidates &= ~keep
        spent = torch.zeros_like(budgets).scatter_add_(0, self.group_of, costs * keep.double())
        # Query-head units: a KV group's key/value heads are paid by the first query head kept
        # from it (protected ones first).
        kv_of = self._kv_of_unit()
        kv_cost = float(self.shape.kv_cost)
        opened = torch.zeros(self.space.shape.n_layers * self.shape.n_kv_heads, dtype=torch.bool)
        if space.query_heads:
            opened[kv_of[keep & (kv_of >= 0)]] = True
            spent.scatter_add_(0, self._kv_group, opened.double() * kv_cost)
        order = torch.argsort(s, descending=True, stable=True)
        order = order[candidates[order]]
        c = costs[order].clone()
        if space.query_heads:  # the first not yet opened query head of each group pays its K/V
            g = kv_of[order]
            heads = (g >= 0).nonzero().flatten()
            first = torch.ones(len(heads), dtype=torch.bool)
            seen = opened.clone()
            for j, grp in enumerate(g[heads].tolist()):
                first[j] = not seen[grp]
                seen[grp] = True
            c[heads[first]] += kv_cost
        # Vectorised prefix per group, then a pass over the rest to fill each group's slack.
        gid = self.group_of[order]
        remaining = budgets - spent
        for grp in range(len(budgets)):
            sel = gid == grp
            idx, cg = order[sel], c[sel]
            fits = torch.cumsum(cg, 0) <= remaining[grp] + 1e-6
            n_prefix = int(fits.sum()) if bool(fits.all()) else int(fits.long().argmin())
            keep[idx[:n_prefix]] = True
            left = remaining[grp] - float(cg[:n_prefix].sum())
            if n_prefix < len(idx):
                kv_prefix = kv_of[idx[:n_prefix]]
                opened[kv_prefix[kv_prefix >= 0]] = True
                rest = idx[n_prefix:]
                min_cost = float(costs[rest].min())
                for u in rest.tolist():
                    if left < min_cost:
                        break
                    k = int(kv_of[u])
                    cu = float(costs[u]) + (kv_cost if k >= 0 and not opened[k] else 0.0)
                    if cu <= left + 1e-6:
                        keep[u] = True
                        left -= cu
                        if k >= 0:
                            opened[k] = True
        return keep

    def _kv_of_unit(self) -> torch.Tensor:
        """The KV group [0, L * Hkv) of each query-head unit, -1 for every other unit."""
        space = self.space
        out = torch.full((space.n_units,), -1, dtype=torch.long)
        if space.query_heads:
            out[space.type_slices()["heads"]] = torch.arange(space.n_heads) // space.shape.q_per_kv
        return out

"""How much is removed, and which units may be."""
from typing import List, Optional

from .base import FRACTION, Settings, layer_list, rule, setting, stage


@stage("budget")
class BudgetSettings(Settings):
    sparsity: float = setting(
        help="fraction of the prunable parameters (attention, MLP, and layers with "
             "--prune-layers) to remove, in (0, 1)", check=FRACTION, resume=True)
    shape: str = setting(
        "free", choices=("free", "uniform"), resume=True,
        help="free: each layer keeps its own numbers of KV groups and MLP channels; uniform: "
             "every layer keeps the same numbers (all KV groups unless --attn-sparsity says "
             "otherwise), so the export is the plain architecture that vLLM, TGI and "
             "llama.cpp load")
    attn_units: str = setting(
        "kv-group", choices=("kv-group", "query-head"), resume=True,
        help="attention units: whole KV groups (a key/value head with its query heads), or "
             "single query heads (a KV group stays while any of its query heads does)")
    budget: str = setting("global", choices=("global", "per-type"), resume=True,
                          help="one parameter budget across all units, or separate "
                               "attention/MLP ratios")
    scope: str = setting("global", choices=("global", "layer"), resume=True,
                         help="budget over the whole model, or the same ratio in every layer")
    attn_sparsity: Optional[float] = setting(
        None, help="with --budget per-type: attention ratio (default: --sparsity); with "
                   "--shape uniform: the share of each layer's KV groups removed (default: 0)",
        check=FRACTION, resume=True)
    mlp_sparsity: Optional[float] = setting(
        None, help="with --budget per-type: MLP ratio (default: --sparsity)", check=FRACTION,
        resume=True)
    prune_layers: bool = setting(False, help="also search over whole layers", resume=True)
    protect_layers: List[int] = setting(
        [], help="comma-separated layers never pruned, e.g. 0,29", parse=layer_list,
        check=rule(lambda v: min(v, default=0) >= 0, "must list layer numbers >= 0"),
        resume=True)

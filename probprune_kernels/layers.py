"""Drop-in masked layers built on :mod:`probprune_kernels.ops`: they share the dense module's
weights (no copy) and compute only the units a mask keeps.

Masks: a bool tensor ``[n_units]`` for one mask (input ``[..., features]``) or ``[K, n_units]`` for
K masks at once (input ``[K, ..., features]``, one leading mask dimension). Every forward equals the
dense module with the pruned units zeroed, and returns the dense module's full output width:

* :class:`MaskedLinear` ``side="out"``: output features of pruned units are exactly 0 (their bias
  too); the kept features are computed compactly and scattered back. ``forward_compact`` returns
  the compact ``[K, M, n_cap * group]`` result instead, for chaining into a ``side="in"`` layer.
* :class:`MaskedLinear` ``side="in"``: input features of pruned units are ignored (as if zeroed);
  the bias is added to every output.
* :class:`MaskedSwiGLUMLP`: ``down(silu(gate(x)) * up(x) * mask)`` over kept channels. On the
  kernel backends it stores the shared down_proj weight column-major (see the class).
* :class:`MaskedLlamaAttention`: attention with whole KV groups (a KV head and its query heads)
  or single query heads removed, i.e. the dense attention whose pruned heads are zeroed before
  ``o_proj``.
* :class:`MaskedDecoderLayer`: norms, masked attention and masked MLP with their residuals, the
  block of the engine's K-mask forward.

Each layer has ``forward`` (takes bool masks and compacts them) and ``forward_compact`` (takes the
index lists and counts of :func:`~probprune_kernels.compact_masks`, so a caller that compacts
all layers' masks in one launch, as the engine does, pays no per-layer compaction).

``layer.refit`` (attention and MLP): a :class:`~probprune_kernels.refit.LeastSquaresRefit` of the
input-side projection (o_proj, down_proj) makes each mask's output the one its least-squares
refit to the kept inputs would give, instead of the bare slice; None (the default) is the slice.

The layers are for inference/search (forward only; the ops have no autograd formula).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from . import dispatch, ops


def _as_masks(mask: Tensor, n_units: int, x: Tensor, in_features: int, name: str = "mask"):
    """Checks ``mask``/``x`` and returns (masks [K, n], x3 [K, M, in], lead shape, squeezed)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be bool, got {mask.dtype}")
    if mask.dim() not in (1, 2) or mask.shape[-1] != n_units:
        raise ValueError(f"{name} must have shape ({n_units},) or (K, {n_units}), "
                         f"got {tuple(mask.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"input has {x.shape[-1]} features, the layer expects {in_features}")
    if mask.dim() == 1:
        lead = x.shape[:-1]
        return mask[None], x.reshape(1, -1, in_features).contiguous(), lead, True
    K = mask.shape[0]
    if x.dim() < 2 or x.shape[0] != K:
        raise ValueError(f"with K={K} masks the input must be [K, ..., {in_features}], "
                         f"got {tuple(x.shape)}")
    return mask, x.reshape(K, -1, in_features).contiguous(), x.shape[:-1], False


def _unit_columns(idx: Tensor, group: int) -> Tensor:
    """idx [K, cap] -> feature ids [K, cap*group] (row ``idx*group + g``)."""
    g = torch.arange(group, device=idx.device, dtype=torch.int64)
    return (idx.long()[:, :, None] * group + g).reshape(idx.shape[0], -1)


def scatter_units(y_compact: Tensor, idx: Tensor, group: int, width: int) -> Tensor:
    """Compact [K, M, cap*group] (zero beyond counts) -> full [K, M, width], zero at pruned units.

    ``scatter_add`` on zeros: padding entries of ``idx`` point at unit 0 but carry zeros, so they
    leave it unchanged, and no host sync is needed to know the counts.
    """
    K, M, _ = y_compact.shape
    out = y_compact.new_zeros(K, M, width)
    cols = _unit_columns(idx, group)[:, None, :].expand(K, M, -1)
    return out.scatter_add_(2, cols, y_compact)


def gather_units(x: Tensor, idx: Tensor, group: int) -> Tensor:
    """Full [K, M, width] -> compact [K, M, cap*group] (entries beyond counts are don't-care)."""
    K, M, _ = x.shape
    cols = _unit_columns(idx, group)[:, None, :].expand(K, M, -1)
    return torch.gather(x, 2, cols)


class MaskedLinear(nn.Module):
    """``nn.Linear`` whose output (``side="out"``) or input (``side="in"``) units can be masked.

    A unit is ``group`` consecutive features (e.g. one attention head = ``head_dim`` rows).
    Build it with :meth:`from_linear`, which shares the linear's weight and bias (no copy).
    """

    def __init__(self, weight: nn.Parameter, bias: Optional[nn.Parameter] = None, side: str = "out",
                 group: int = 1, backend: Optional[str] = None):
        super().__init__()
        if side not in ("out", "in"):
            raise ValueError(f"side must be 'out' or 'in', got {side!r}")
        self.weight = weight
        self.bias = bias
        self.side, self.group, self.backend = side, group, backend
        self.out_features, self.in_features = weight.shape
        width = self.out_features if side == "out" else self.in_features
        if group < 1 or width % group:
            raise ValueError(f"{'out' if side == 'out' else 'in'}_features ({width}) must be a "
                             f"multiple of group ({group})")
        self.n_units = width // group

    @classmethod
    def from_linear(cls, linear: nn.Linear, side: str = "out", group: int = 1,
                    backend: Optional[str] = None) -> "MaskedLinear":
        """Wraps ``linear``: the weight/bias Parameters are the same objects (no copy)."""
        return cls(linear.weight, linear.bias, side=side, group=group, backend=backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"side={self.side!r}, group={self.group}, n_units={self.n_units}, "
                f"bias={self.bias is not None}")

    def forward_compact(self, x3: Tensor, idx: Tensor, counts: Tensor) -> Tensor:
        """Lower level: x3 [K, M, in] -> the op's output, with precomputed ``compact_masks``.

        side="out": compact [K, M, n_cap*group] (zero beyond counts). side="in": x3 must already be
        compact [K, M, n_cap*group]; returns [K, M, out] (bias added).
        """
        if self.side == "out":
            return ops.gather_rows_gemm(x3, self.weight, idx, counts, self.group, self.bias,
                                        backend=self.backend, validate=False)
        y = ops.gather_cols_gemm(x3, self.weight, idx, counts, self.group, None,
                                 backend=self.backend, validate=False)
        return y if self.bias is None else y + self.bias

    def forward(self, x: Tensor, mask: Tensor, capacity: Optional[int] = None) -> Tensor:
        """x [..., in] with mask [n_units], or x [K, ..., in] with mask [K, n_units] -> the dense
        output shape ``[..., out]`` / ``[K, ..., out]`` (pruned output features are 0 for
        side="out"; pruned input features are ignored for side="in")."""
        masks, x3, lead, _ = _as_masks(mask, self.n_units, x, self.in_features)
        idx, counts = ops.compact_masks(masks, capacity, backend=self.backend)
        if self.side == "out":
            yc = self.forward_compact(x3, idx, counts)
            y = scatter_units(yc, idx, self.group, self.out_features)
        else:
            y = self.forward_compact(gather_units(x3, idx, self.group), idx, counts)
        return y.reshape(*lead, self.out_features)


def _check_silu(mlp: nn.Module) -> None:
    act = getattr(mlp, "act_fn", None)
    if act is not None and not (isinstance(act, nn.SiLU) or "silu" in type(act).__name__.lower()):
        raise ValueError(f"MaskedSwiGLUMLP needs a SiLU gate activation, got {type(act).__name__}")


class MaskedSwiGLUMLP(nn.Module):
    """LLaMA-style MLP ``down(silu(gate(x)) * up(x))`` with a mask over its intermediate channels.

    gate/up rows and down columns of kept channels only are read: one fused gather-rows SwiGLU
    launch for gate+up, one gather-cols launch for down.

    down_proj's kept columns are single columns (group 1), which a row-major weight scatters over
    memory: where gather-cols runs on a kernel backend (triton, cuda) for the weight's device, the
    layer stores the shared down_proj weight column-major, in place (:func:`column_major`). One
    copy stays: the dense module reads the same values through the same Parameter, and
    ``F.linear`` takes either layout.
    """

    def __init__(self, gate_proj: nn.Linear, up_proj: nn.Linear, down_proj: nn.Linear,
                 backend: Optional[str] = None):
        super().__init__()
        for name, lin in (("gate_proj", gate_proj), ("up_proj", up_proj)):
            if lin.bias is not None:
                raise ValueError(f"{name} has a bias; the fused SwiGLU op supports bias-free "
                                 f"gate/up projections only (LLaMA-style, mlp_bias=False)")
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.backend = backend
        if _runs_on_kernels("gather_cols_gemm", down_proj.weight.device, backend):
            column_major(down_proj.weight)
        self.hidden_size = gate_proj.in_features
        self.n_units = gate_proj.out_features
        self.refit = None  # a LeastSquaresRefit of down_proj, or None: the bare slice

    @classmethod
    def from_mlp(cls, mlp: nn.Module, backend: Optional[str] = None) -> "MaskedSwiGLUMLP":
        """From an HF-style MLP with ``gate_proj``/``up_proj``/``down_proj`` (shared weights)."""
        _check_silu(mlp)
        return cls(mlp.gate_proj, mlp.up_proj, mlp.down_proj, backend=backend)

    def forward_compact(self, x: Tensor, idx: Tensor, counts: Tensor,
                        residual: Optional[Tensor] = None,
                        layer_keep: Optional[Tensor] = None) -> Tensor:
        """x [K, ..., d] with precomputed ``compact_masks`` idx/counts -> [K, ..., d] (+ residual,
        fused into the down GEMM). ``layer_keep`` [K] (0/1) marks masks that keep the layer at
        all: a dropped layer has counts 0 and adds no bias, so the residual passes through."""
        K = x.shape[0]
        h = self.channel_outputs(x, idx, counts)
        res = None if residual is None else residual.reshape(K, -1, self.hidden_size)
        y = _read_kept(self, h, self.down_proj.weight, idx, counts, 1, res)
        return _add_bias(y, self.down_proj.bias, layer_keep).reshape(x.shape)

    def channel_outputs(self, x: Tensor, idx: Tensor, counts: Tensor) -> Tensor:
        """``silu(gate(x)) * up(x)`` of the kept channels, what down_proj reads: x [K, ..., d] ->
        [K, M, cap], channel ``idx[k, j]`` in column j."""
        K = x.shape[0]
        return ops.gather_rows_swiglu(x.reshape(K, -1, self.hidden_size), self.gate_proj.weight,
                                      self.up_proj.weight, idx, counts, backend=self.backend,
                                      validate=False)

    def forward(self, x: Tensor, mask: Tensor, capacity: Optional[int] = None) -> Tensor:
        """x [..., d] with mask [F], or x [K, ..., d] with mask [K, F] -> same shape as x."""
        masks, x3, lead, _ = _as_masks(mask, self.n_units, x, self.hidden_size)
        idx, counts = ops.compact_masks(masks, capacity, backend=self.backend)
        return self.forward_compact(x3, idx, counts).reshape(*lead, self.hidden_size)


class MaskedGeGLUMLP(MaskedSwiGLUMLP):
    """Gemma's MLP ``down(gelu_tanh(gate(x)) * up(x))`` with a mask over its intermediate
    channels: gate and up as two gather-rows GEMMs and the GELU between them (the fused kernel is
    SwiGLU's), down as one gather-cols launch."""

    def channel_outputs(self, x: Tensor, idx: Tensor, counts: Tensor) -> Tensor:
        x3 = x.reshape(x.shape[0], -1, self.hidden_size)
        gate, up = (ops.gather_rows_gemm(x3, w, idx, counts, 1, None, backend=self.backend,
                                         validate=False)
                    for w in (self.gate_proj.weight, self.up_proj.weight))
        # columns past a mask's count are zero in both, and stay zero: gelu(0) * 0
        return torch.nn.functional.gelu(gate, approximate="tanh") * up


def _runs_on_kernels(op: str, device: torch.device, backend: Optional[str]) -> bool:
    """True when ``op`` on ``device`` resolves to a kernel backend (not the reference); a backend
    that cannot run here raises later, at the op, as without the layer."""
    try:
        return dispatch.resolve(op, device, backend) != "reference"
    except dispatch.BackendUnavailableError:
        return False


def column_major(weight: Tensor) -> None:
    """Stores the matrix ``weight`` [out, in] (a Parameter, or a tensor) column-major in place:
    ``weight.data`` becomes the transposed view of a contiguous [in, out] tensor, the layout in
    which gather-cols reads single gathered columns as contiguous rows (vector loads). Same values
    and shape; the old storage is freed once no one else holds it, so one matrix is copied at a
    time. A no-op on a matrix already column-major."""
    if not weight.t().is_contiguous():
        with torch.no_grad():
            weight.data = weight.data.t().contiguous().t()


def _read_kept(layer: nn.Module, x: Tensor, weight: Tensor, idx: Tensor, counts: Tensor,
               group: int, residual: Optional[Tensor]) -> Tensor:
    """The input-side GEMM of a layer over its kept units: the bare slice, or with a
    :class:`~probprune_kernels.refit.LeastSquaresRefit` attached as ``layer.refit``, each mask's
    refit output."""
    if layer.refit is None:
        return ops.gather_cols_gemm(x, weight, idx, counts, group, residual,
                                    backend=layer.backend, validate=False)
    return layer.refit.output(x, weight, idx, counts, residual, layer.backend)


def _add_bias(y: Tensor, bias: Optional[Tensor], layer_keep: Optional[Tensor]) -> Tensor:
    """y [K, M, d] + bias, for the masks whose ``layer_keep`` [K] is 1 (all when None)."""
    if bias is None:
        return y
    if layer_keep is None:
        return y + bias
    return y + bias * layer_keep.to(y.dtype)[:, None, None]


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """HF-style RoPE on x [K, B, T, H, D]; cos/sin [T, D] or [B, T, D] (``cat(f, f)`` layout)."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[None, :, :, None, :].to(x.dtype), sin[None, :, :, None, :].to(x.dtype)
    return x * cos + _rotate_half(x) * sin


ATTN_UNITS = ("kv-group", "query-head")


class MaskedLlamaAttention(nn.Module):
    """LLaMA/GQA self-attention with a mask over its heads: whole KV groups (a KV head and its
    Hq/Hkv query heads, ``units="kv-group"``) or single query heads (``units="query-head"``; a KV
    group is computed while any of its query heads is kept).

    One path for both: the mask becomes :class:`~probprune_kernels.ops.HeadLists` (kept query
    heads, kept KV groups, the KV slot of each query head); q is a gather-rows GEMM over the kept
    query heads (``head_dim`` rows each), k/v over the kept groups, RoPE with caller-supplied
    cos/sin, causal attention over the kept heads only, and a gather-cols GEMM for o_proj.
    ``q_norm`` / ``k_norm`` (Qwen3): norms over each head's ``head_dim`` features, one weight
    shared by every head, applied to q and k before RoPE.
    """

    def __init__(self, q_proj: nn.Linear, k_proj: nn.Linear, v_proj: nn.Linear, o_proj: nn.Linear,
                 num_heads: int, num_kv_heads: int, head_dim: int, scale: Optional[float] = None,
                 backend: Optional[str] = None, q_norm: Optional[nn.Module] = None,
                 k_norm: Optional[nn.Module] = None, units: str = "kv-group"):
        super().__init__()
        if (q_norm is None) != (k_norm is None):
            raise ValueError("q_norm and k_norm come together: give both or neither")
        if units not in ATTN_UNITS:
            raise ValueError(f"units must be one of {', '.join(ATTN_UNITS)}, got {units!r}")
        if num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        for name, lin, rows in (("q_proj", q_proj, num_heads * head_dim),
                                ("k_proj", k_proj, num_kv_heads * head_dim),
                                ("v_proj", v_proj, num_kv_heads * head_dim)):
            if lin.out_features != rows:
                raise ValueError(f"{name} has {lin.out_features} outputs, expected {rows}")
        if o_proj.in_features != num_heads * head_dim:
            raise ValueError(f"o_proj has {o_proj.in_features} inputs, expected "
                             f"{num_heads * head_dim}")
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.q_norm, self.k_norm = q_norm, k_norm
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.G = num_heads // num_kv_heads
        self.scale, self.backend, self.units = scale, backend, units
        self.hidden_size = q_proj.in_features
        self.n_units = num_heads if units == "query-head" else num_kv_heads
        self.refit = None  # a LeastSquaresRefit of o_proj, or None: the bare slice

    @classmethod
    def from_hf(cls, attn: nn.Module, config=None, backend: Optional[str] = None,
                units: str = "kv-group"):
        """From an HF ``LlamaAttention``-like module (sizes from ``config`` or the module)."""
        config = config if config is not None else getattr(attn, "config", None)
        num_heads = getattr(config, "num_attention_heads", None) or attn.num_heads
        num_kv = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(attn, "head_dim", None) or attn.q_proj.out_features // num_heads
        scale = getattr(attn, "scaling", None)
        return cls(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, num_heads, num_kv,
                   head_dim, scale=scale, backend=backend, q_norm=getattr(attn, "q_norm", None),
                   k_norm=getattr(attn, "k_norm", None), units=units)

    def head_lists(self, masks: Tensor, capacity: Optional[int] = None) -> ops.HeadLists:
        """Bool masks [K, n_units] over this layer's units -> its index lists."""
        if self.units == "query-head":
            return ops.head_lists(masks, self.G, capacity, backend=self.backend)
        idx, counts = ops.compact_masks(masks, capacity, backend=self.backend)
        return ops.head_lists_from_groups(idx, counts, self.G)

    def forward_compact(self, x: Tensor, cos: Tensor, sin: Tensor, heads: ops.HeadLists,
                        residual: Optional[Tensor] = None,
                        layer_keep: Optional[Tensor] = None) -> Tensor:
        """x [K, B, T, d] with precomputed index lists -> [K, B, T, d] (+ residual, fused into
        the o_proj GEMM). cos/sin [T, D] or [B, T, D]. ``layer_keep`` [K] (0/1): a mask that
        drops the layer has counts 0 and adds no o_proj bias, so the residual passes through."""
        K, B, T, d = x.shape
        o = self.head_outputs(x, cos, sin, heads)
        res = None if residual is None else residual.reshape(K, B * T, d)
        y = _read_kept(self, o, self.o_proj.weight, heads.q_idx, heads.q_counts, self.head_dim,
                       res)
        return _add_bias(y, self.o_proj.bias, layer_keep).view(K, B, T, d)

    def head_outputs(self, x: Tensor, cos: Tensor, sin: Tensor, heads: ops.HeadLists) -> Tensor:
        """The attention output of the kept heads before o_proj: x [K, B, T, d] ->
        [K, B*T, q_cap*head_dim], query head ``q_idx[k, j]`` in columns ``j*D:(j+1)*D`` (what
        o_proj's kept columns read; with every head kept, the dense column order)."""
        K, B, T, d = x.shape
        D, be = self.head_dim, self.backend
        x3 = x.reshape(K, B * T, d)
        q_cap, kv_cap = heads.q_idx.shape[1], heads.kv_idx.shape[1]
        q = ops.gather_rows_gemm(x3, self.q_proj.weight, heads.q_idx, heads.q_counts, D,
                                 self.q_proj.bias, backend=be, validate=False)
        k = ops.gather_rows_gemm(x3, self.k_proj.weight, heads.kv_idx, heads.kv_counts, D,
                                 self.k_proj.bias, backend=be, validate=False)
        v = ops.gather_rows_gemm(x3, self.v_proj.weight, heads.kv_idx, heads.kv_counts, D,
                                 self.v_proj.bias, backend=be, validate=False)
        q, k, v = q.view(K, B, T, q_cap, D), k.view(K, B, T, kv_cap, D), v.view(K, B, T, kv_cap, D)
        if self.q_norm is not None:  # per head, so kept heads are normed as in the dense model
            q, k = self.q_norm(q), self.k_norm(k)
        # The norm and RoPE of the zero padding heads stay zero, so the compact layout needs no
        # special case.
        q = apply_rotary(q, cos, sin).contiguous()
        k = apply_rotary(k, cos, sin).contiguous()
        o = ops.masked_attention_heads(q, k, v, heads.q_counts, heads.kv_slot, self.scale,
                                       backend=be, validate=False)
        return o.reshape(K, B * T, q_cap * D)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor,
                capacity: Optional[int] = None) -> Tensor:
        """x [B, T, d] with mask [n_units], or x [K, B, T, d] with mask [K, n_units] (n_units:
        Hkv groups or Hq query heads); cos/sin [T, D] or [B, T, D] (position embeddings, shared
        by the K masks) -> same shape as x."""
        if x.dim() != (4 if mask.dim() == 2 else 3):
            raise ValueError(f"x must be [B, T, d] (one mask) or [K, B, T, d] (K masks), got "
                             f"{tuple(x.shape)} with mask {tuple(mask.shape)}")
        masks, x3, lead, _ = _as_masks(mask, self.n_units, x, self.hidden_size)
        B, T = lead[-2], lead[-1]
        y = self.forward_compact(x3.view(masks.shape[0], B, T, -1), cos, sin,
                                 self.head_lists(masks, capacity))
        return y.reshape(*lead, self.hidden_size)


class MaskedDecoderLayer(nn.Module):
    """A LLaMA decoder layer (pre-norm attention and SwiGLU MLP, each with its residual) whose KV
    groups and MLP channels are masked: the block the engine's K-mask forward is made of.

    Shares the Hugging Face layer's modules (norms, projections): no copy.
    """

    def __init__(self, input_layernorm: nn.Module, self_attn: MaskedLlamaAttention,
                 post_attention_layernorm: nn.Module, mlp: MaskedSwiGLUMLP,
                 attn_out_norm: Optional[nn.Module] = None,
                 mlp_out_norm: Optional[nn.Module] = None):
        """``attn_out_norm`` / ``mlp_out_norm``: norms of each block's output before it joins the
        residual (Gemma's "sandwich" norms); then ``post_attention_layernorm`` is the MLP's
        input norm (Gemma's ``pre_feedforward_layernorm``)."""
        super().__init__()
        if (attn_out_norm is None) != (mlp_out_norm is None):
            raise ValueError("attn_out_norm and mlp_out_norm come together: give both or neither")
        self.input_layernorm, self.self_attn = input_layernorm, self_attn
        self.post_attention_layernorm, self.mlp = post_attention_layernorm, mlp
        self.attn_out_norm, self.mlp_out_norm = attn_out_norm, mlp_out_norm

    @property
    def attn_norm(self) -> nn.Module:
        """The norm of the attention block's input."""
        return self.input_layernorm

    @property
    def mlp_norm(self) -> nn.Module:
        """The norm of the MLP block's input."""
        return self.post_attention_layernorm

    def attn_out(self, y: Tensor) -> Tensor:
        """What the attention block's output ``y`` adds to the residual stream."""
        return y if self.attn_out_norm is None else self.attn_out_norm(y)

    def mlp_out(self, y: Tensor) -> Tensor:
        """What the MLP block's output ``y`` adds to the residual stream."""
        return y if self.mlp_out_norm is None else self.mlp_out_norm(y)

    @classmethod
    def from_hf(cls, layer: nn.Module, config=None, backend: Optional[str] = None,
                attn_units: str = "kv-group") -> "MaskedDecoderLayer":
        """From an HF ``LlamaDecoderLayer``-like module (Llama, Mistral, Qwen2, Qwen3)."""
        return cls(layer.input_layernorm,
                   MaskedLlamaAttention.from_hf(layer.self_attn, config, backend, attn_units),
                   layer.post_attention_layernorm, MaskedSwiGLUMLP.from_mlp(layer.mlp, backend))

    def forward_compact(self, h: Tensor, cos: Tensor, sin: Tensor, heads: ops.HeadLists,
                        channels: Tuple[Tensor, Tensor],
                        layer_keep: Optional[Tensor] = None) -> Tensor:
        """h [K, B, T, d]; ``heads``: the attention's index lists; ``channels``: (idx, counts) of
        ``compact_masks`` over the MLP channels; ``layer_keep`` [K] folds a dropped layer in (its
        counts must be 0 too) -> [K, B, T, d]."""
        if self.attn_out_norm is None:  # the residual add fused into each block's last GEMM
            h = self.self_attn.forward_compact(self.input_layernorm(h), cos, sin, heads,
                                               residual=h, layer_keep=layer_keep)
            return self.mlp.forward_compact(self.post_attention_layernorm(h), *channels,
                                            residual=h, layer_keep=layer_keep)
        # A dropped layer's blocks output zeros, which the (RMS) out norms keep at zero.
        h = h + self.attn_out_norm(self.self_attn.forward_compact(
            self.input_layernorm(h), cos, sin, heads, layer_keep=layer_keep))
        return h + self.mlp_out_norm(self.mlp.forward_compact(
            self.post_attention_layernorm(h), *channels, layer_keep=layer_keep))

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, head_mask: Tensor,
                channel_mask: Tensor) -> Tensor:
        """h [K, B, T, d] with head_mask [K, n_units] (KV groups or query heads) and channel_mask
        [K, F] -> [K, B, T, d]."""
        if h.dim() != 4 or head_mask.dim() != 2 or channel_mask.dim() != 2:
            raise ValueError(f"h must be [K, B, T, d] with masks [K, heads] and [K, F], got "
                             f"{tuple(h.shape)}, {tuple(head_mask.shape)}, "
                             f"{tuple(channel_mask.shape)}")
        _as_masks(head_mask, self.self_attn.n_units, h, self.self_attn.hidden_size, "head_mask")
        _as_masks(channel_mask, self.mlp.n_units, h, self.mlp.hidden_size, "channel_mask")
        be = self.mlp.backend
        return self.forward_compact(h, cos, sin, self.self_attn.head_lists(head_mask),
                                    ops.compact_masks(channel_mask, backend=be))

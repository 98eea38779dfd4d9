"""Drop-in layers against the dense modules with the pruned units zeroed (reference backend, and
Triton under the interpreter / on a GPU)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import probprune_kernels  # noqa: E402
from probprune_kernels import MaskedLinear, MaskedLlamaAttention, MaskedSwiGLUMLP  # noqa: E402
from tests.conftest import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HIDDEN = 48  # a multiple of every head count used below
_TRITON_SKIP = probprune_kernels.dispatch.triton_unavailable_reason(device=DEVICE)
BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.skipif(
    _TRITON_SKIP is not None, reason=f"triton backend: {_TRITON_SKIP}"))]
# every test runs on DEVICE: the GPU when there is one (``pytest -m gpu``)
pytestmark = pytest.mark.gpu


def _mask(shape, p=0.5):
    m = torch.rand(shape) < p
    if m.dim() == 2 and m.shape[0] >= 3:
        m[0], m[1] = False, True  # an empty and a full mask among the K
    return m


# ---------------------------------------------------------------------------------- MaskedLinear

def test_from_linear_shares_weight():
    lin = nn.Linear(37, 45)
    ml = MaskedLinear.from_linear(lin, side="out", group=3)
    assert ml.weight is lin.weight and ml.bias is lin.bias
    assert ml.weight.data_ptr() == lin.weight.data_ptr()
    assert ml.bias.data_ptr() == lin.bias.data_ptr()
    assert sum(p.numel() for p in ml.parameters()) == sum(p.numel() for p in lin.parameters())
    assert ml.n_units == 15 and "side='out'" in repr(ml)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side", ["out", "in"])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("K", [None, 3])
def test_masked_linear(backend, side, group, bias, K):
    lin = nn.Linear(36, 45, bias=bias).to(DEVICE)
    ml = MaskedLinear.from_linear(lin, side=side, group=group, backend=backend)
    n = (45 if side == "out" else 36) // group
    lead = (2, 5) if K is None else (K, 2, 5)
    x = torch.randn(*lead, 36, device=DEVICE)
    mask = _mask((n,) if K is None else (K, n)).to(DEVICE)
    y = ml(x, mask)
    feat = mask.repeat_interleave(group, dim=-1).to(x.dtype)  # [.., features]
    if K is not None:
        feat = feat[:, None, None, :]
    with torch.no_grad():
        dense = lin(x) * feat if side == "out" else lin(x * feat)
    assert y.shape == dense.shape
    assert_close(y, dense)
    if side == "out":  # pruned outputs are exactly zero, bias included
        assert torch.all(y[(feat.expand_as(y) == 0)] == 0)


def test_masked_linear_compact_chain():
    """forward_compact(out) feeds forward_compact(in) without scattering: x -> up -> down."""
    up, down = nn.Linear(16, 24), nn.Linear(24, 16)
    mu = MaskedLinear.from_linear(up, "out", group=4)
    md = MaskedLinear.from_linear(down, "in", group=4)
    masks = _mask((3, 6))
    idx, counts = probprune_kernels.compact_masks(masks)
    x = torch.randn(3, 7, 16)
    y = md.forward_compact(mu.forward_compact(x, idx, counts), idx, counts)
    with torch.no_grad():
        dense = down(up(x) * masks.repeat_interleave(4, 1)[:, None, :].float())
    assert_close(y, dense)


def test_masked_linear_bad_mask():
    ml = MaskedLinear.from_linear(nn.Linear(8, 6), group=2)
    with pytest.raises(ValueError, match=r"mask must have shape \(3,\) or \(K, 3\)"):
        ml(torch.randn(4, 8), torch.ones(6, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask must be bool"):
        ml(torch.randn(4, 8), torch.ones(3))
    with pytest.raises(ValueError, match="with K=2 masks the input must be"):
        ml(torch.randn(3, 4, 8), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="multiple of group"):
        MaskedLinear.from_linear(nn.Linear(8, 7), group=2)


# -------------------------------------------------------------------------------- MaskedSwiGLUMLP

def _llama_config(**kw):
    transformers = pytest.importorskip("transformers")
    cfg = dict(hidden_size=HIDDEN, intermediate_size=45, num_attention_heads=6,
               num_key_value_heads=2,
               head_dim=8, num_hidden_layers=1, vocab_size=64, attn_implementation="eager")
    cfg.update(kw)
    return transformers.LlamaConfig(**cfg)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [None, 3])
def test_masked_swiglu_mlp(backend, K):
    from transformers.models.llama.modeling_llama import LlamaMLP
    mlp = LlamaMLP(_llama_config()).to(DEVICE)
    mm = MaskedSwiGLUMLP.from_mlp(mlp, backend=backend)
    assert mm.gate_proj.weight.data_ptr() == mlp.gate_proj.weight.data_ptr()
    lead = (2, 5) if K is None else (K, 2, 5)
    x = torch.randn(*lead, HIDDEN, device=DEVICE)
    mask = _mask((45,) if K is None else (K, 45)).to(DEVICE)
    y = mm(x, mask)
    ch = mask.float() if K is None else mask.float()[:, None, None, :]
    with torch.no_grad():
        dense = mlp.down_proj(F.silu(mlp.gate_proj(x)) * mlp.up_proj(x) * ch)
        assert_close(mm(x, torch.ones_like(mask)), mlp(x))  # all-ones mask = the HF module
    assert_close(y, dense)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_swiglu_mlp_stores_down_proj_for_gather_cols(backend):
    """On a kernel backend down_proj's weight becomes column-major in place (gathered columns
    contiguous), still one Parameter shared with the HF module; the reference leaves it as is."""
    from transformers.models.llama.modeling_llama import LlamaMLP
    mlp = LlamaMLP(_llama_config()).to(DEVICE)
    param, before = mlp.down_proj.weight, mlp.down_proj.weight.detach().clone()
    mm = MaskedSwiGLUMLP.from_mlp(mlp, backend=backend)
    w = mm.down_proj.weight
    assert w is param and mlp.down_proj.weight is param and torch.equal(w, before)
    assert w.stride() == ((1, HIDDEN) if backend == "triton" else (45, 1))
    MaskedSwiGLUMLP.from_mlp(mlp, backend=backend)  # a second layer on the same module: no copy
    assert mlp.down_proj.weight.data_ptr() == w.data_ptr()


def test_masked_swiglu_rejects_other_activation():
    from transformers.models.llama.modeling_llama import LlamaMLP
    with pytest.raises(ValueError, match="SiLU"):
        MaskedSwiGLUMLP.from_mlp(LlamaMLP(_llama_config(hidden_act="gelu")))


# --------------------------------------------------------------------------- MaskedLlamaAttention

def _hf_attention(G, arch="llama"):
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding
    cfg = _llama_config(num_attention_heads=2 * G, num_key_value_heads=2)
    if arch == "qwen3":  # q_norm / k_norm per head before RoPE
        from transformers import Qwen3Config
        from transformers.models.qwen3.modeling_qwen3 import Qwen3Attention
        cfg = Qwen3Config(**{k: v for k, v in cfg.to_dict().items()
                             if k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                      "num_key_value_heads", "head_dim", "num_hidden_layers",
                                      "vocab_size")}, attn_implementation="eager")
        attn = Qwen3Attention(cfg, layer_idx=0).to(DEVICE).eval()
        with torch.no_grad():  # they start at ones; distinct weights catch a swapped or lost norm
            attn.q_norm.weight.normal_(1.0, 0.3)
            attn.k_norm.weight.normal_(1.0, 0.3)
    else:
        attn = LlamaAttention(cfg, layer_idx=0).to(DEVICE).eval()
    rope = LlamaRotaryEmbedding(cfg).to(DEVICE)
    return cfg, attn, rope


def _dense_masked(attn, x, cos, sin, head_mask, T):
    """HF forward with the query heads of pruned KV groups zeroed before o_proj (hook)."""
    hook = attn.o_proj.register_forward_pre_hook(
        lambda mod, args: (args[0] * head_mask.repeat_interleave(attn.head_dim).to(args[0].dtype),))
    try:
        causal = torch.full((T, T), float("-inf"), device=x.device).triu(1)[None, None]
        return attn(x, position_embeddings=(cos, sin), attention_mask=causal)[0]
    finally:
        hook.remove()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("G", [1, 3])
@pytest.mark.parametrize("K", [None, 3])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_masked_llama_attention(backend, G, K, arch):
    cfg, attn, rope = _hf_attention(G, arch)
    B, T = 2, 13
    ma = MaskedLlamaAttention.from_hf(attn, cfg, backend=backend)
    assert ma.q_proj.weight.data_ptr() == attn.q_proj.weight.data_ptr()
    x = torch.randn(*((B, T) if K is None else (K, B, T)), HIDDEN, device=DEVICE)
    pos = torch.arange(T, device=DEVICE)[None].expand(B, T)
    cos, sin = rope(x, pos)
    mask = (_mask((2,)) if K is None else torch.tensor([[False, False], [True, True],
                                                        [False, True]])).to(DEVICE)
    with torch.no_grad():
        y = ma(x, cos, sin, mask)
        if K is None:
            dense = _dense_masked(attn, x, cos, sin, mask.repeat_interleave(G), T)
            full = attn(x, position_embeddings=(cos, sin),
                        attention_mask=torch.full((T, T), float("-inf"),
                                                  device=DEVICE).triu(1)[None, None])[0]
            assert_close(ma(x, cos, sin, torch.ones_like(mask)), full)
        else:
            dense = torch.stack([_dense_masked(attn, x[k], cos, sin,
                                               mask[k].repeat_interleave(G), T) for k in range(K)])
    assert y.shape == x.shape
    assert_close(y, dense)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_masked_llama_attention_query_head_units(backend, arch):
    """Single query heads pruned inside KV groups, K masks in one call: the HF attention with
    those heads' columns zeroed before o_proj. Masks: a group left with one query head, no head
    at all, every head, groups of different sizes."""
    G = 3
    cfg, attn, rope = _hf_attention(G, arch)
    ma = MaskedLlamaAttention.from_hf(attn, cfg, backend=backend, units="query-head")
    assert ma.n_units == 2 * G
    B, T = 2, 13
    masks = torch.tensor([[1, 0, 0, 1, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1],
                          [0, 1, 1, 0, 0, 1]], dtype=torch.bool, device=DEVICE)
    x = torch.randn(4, B, T, HIDDEN, device=DEVICE)
    cos, sin = rope(x[0], torch.arange(T, device=DEVICE)[None].expand(B, T))
    with torch.no_grad():
        y = ma(x, cos, sin, masks)
        dense = torch.stack([_dense_masked(attn, x[k], cos, sin, masks[k], T) for k in range(4)])
    assert_close(y, dense)
    with pytest.raises(ValueError, match=r"mask must have shape \(6,\) or \(K, 6\)"):
        ma(x, cos, sin, masks[:, :2])
    with pytest.raises(ValueError, match="units must be one of kv-group, query-head"):
        MaskedLlamaAttention.from_hf(attn, cfg, units="head")


def test_q_norm_needs_k_norm():
    _, attn, _ = _hf_attention(1, "qwen3")
    with pytest.raises(ValueError, match="q_norm and k_norm come together"):
        MaskedLlamaAttention(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, 2, 2, 8,
                             q_norm=attn.q_norm)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_geglu_mlp(backend):
    """Gemma's MLP: the masked channels of ``down(gelu_tanh(gate x) * up x)``."""
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MLP
    from probprune_kernels import MaskedGeGLUMLP
    mlp = Gemma3MLP(Gemma3TextConfig(hidden_size=HIDDEN, intermediate_size=45)).to(DEVICE)
    mm = MaskedGeGLUMLP(mlp.gate_proj, mlp.up_proj, mlp.down_proj, backend=backend)
    x = torch.randn(3, 2, 5, HIDDEN, device=DEVICE)
    mask = _mask((3, 45)).to(DEVICE)
    with torch.no_grad():
        act = F.gelu(mlp.gate_proj(x), approximate="tanh") * mlp.up_proj(x)
        assert_close(mm(x, mask), mlp.down_proj(act * mask.float()[:, None, None, :]))
        assert_close(mm(x, torch.ones_like(mask)), mlp(x))  # all-ones mask = the HF module


# --------------------------------------------------------------------------- MaskedDecoderLayer

@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_decoder_layer(backend):
    """Against the HF decoder layer with pruned heads and channels zeroed by hooks, per mask; a
    dropped layer (counts 0, layer_keep 0) passes its input through."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
    from probprune_kernels.layers import MaskedDecoderLayer
    cfg = _llama_config(num_attention_heads=6, num_key_value_heads=2)
    layer = LlamaDecoderLayer(cfg, layer_idx=0).to(DEVICE).eval()
    block = MaskedDecoderLayer.from_hf(layer, cfg, backend=backend)
    K, B, T = 3, 2, 9
    h = torch.randn(K, B, T, HIDDEN, device=DEVICE)
    cos, sin = LlamaRotaryEmbedding(cfg).to(DEVICE)(h[0], torch.arange(T, device=DEVICE)[None])
    heads = torch.tensor([[True, False], [False, False], [True, True]], device=DEVICE)
    chans = _mask((K, cfg.intermediate_size)).to(DEVICE)
    causal = torch.full((T, T), float("-inf"), device=DEVICE).triu(1)[None, None]
    expected = []
    for k in range(K):
        q_cols = heads[k].repeat_interleave(3 * layer.self_attn.head_dim).to(h.dtype)
        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
                     lambda m, a, c=q_cols: (a[0] * c,)),
                 layer.mlp.down_proj.register_forward_pre_hook(
                     lambda m, a, c=chans[k].to(h.dtype): (a[0] * c,))]
        try:
            with torch.no_grad():
                out = layer(h[k], attention_mask=causal, position_embeddings=(cos, sin))
        finally:
            for hook in hooks:
                hook.remove()
        expected.append(out[0] if isinstance(out, tuple) else out)
    with torch.no_grad():
        assert_close(block(h, cos, sin, heads, chans), torch.stack(expected))
        lists = block.self_attn.head_lists(heads)
        idx_c, cnt_c = probprune_kernels.compact_masks(chans)
        keep = torch.tensor([1, 0, 1], dtype=torch.int32, device=DEVICE)
        lists = lists._replace(q_counts=lists.q_counts * keep, kv_counts=lists.kv_counts * keep)
        y = block.forward_compact(h, cos, sin, lists, (idx_c, cnt_c * keep), keep)
    assert torch.equal(y[1], h[1])
    assert_close(y[[0, 2]], torch.stack(expected)[[0, 2]])

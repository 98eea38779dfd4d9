"""Model families: each adapter's names and shape rules checked against the Hugging Face model
itself, and no module outside the adapters naming a Hugging Face attribute path."""
import os
import re

import pytest
import torch
from transformers import AutoModelForCausalLM

from probprune.families import (FAMILIES, UnsupportedModelError, family_of, shape_of,
                                supported_names)
from tests.conftest import ARCHS
from tests.tiny_models import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")


@pytest.fixture(scope="module", params=ARCHS)
def model(request):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(request.param)).eval()


def test_every_name_is_a_module_of_the_model(model):
    family = family_of(model.config)
    L = model.config.num_hidden_layers
    for role, name in family.module_names(L).items():
        assert isinstance(model.get_submodule(name), torch.nn.Module), role
    sd = model.state_dict()
    for l in range(L):
        for role in PROJECTIONS:
            assert family.key(l, role) + ".weight" in sd
        for role in ("attn_norm", "mlp_norm"):
            assert family.part(family.layers(model)[l], role).weight.dim() == 1
    assert family.head(model) is model.get_output_embeddings()
    assert family.layers(model)[0] is model.get_submodule(family.layer_prefix(0)[:-1])


def test_shape_is_the_shape_of_the_projections(model):
    family, config = family_of(model.config), model.config
    shape = shape_of(config)
    layer = family.layers(model)[0]
    proj = {role: family.part(layer, role) for role in PROJECTIONS}
    hd, d = shape.head_dim, shape.hidden
    assert (proj["q"].out_features, proj["q"].in_features) == (shape.n_query_heads * hd, d)
    assert proj["k"].out_features == proj["v"].out_features == shape.n_kv_heads * hd
    assert proj["o"].in_features == shape.n_query_heads * hd
    assert proj["gate"].out_features == proj["down"].in_features == shape.intermediate
    assert shape.attn_bias == (proj["q"].bias is not None)
    assert shape.o_bias == (proj["o"].bias is not None)
    # the unit costs add up to the layer's parameter count: nothing is counted twice or missed
    assert shape.layer_cost == sum(p.numel() for p in layer.parameters())


def test_slice_rules_cut_every_unit_tensor_and_keep_the_rest(model):
    family = family_of(model.config)
    shape = shape_of(model.config)
    sizes = {"q_rows": shape.n_query_heads * shape.head_dim,
             "kv_rows": shape.n_kv_heads * shape.head_dim, "channels": shape.intermediate}
    prefix = family.layer_prefix(0)
    for key, t in model.state_dict().items():
        if not key.startswith(prefix):
            continue
        rule = family.slice_rule(key[len(prefix):])
        if rule is None:  # norms: one weight per feature of the residual or of a head
            assert t.dim() == 1 and t.numel() in (shape.hidden, shape.head_dim), key
        else:
            dim, units = rule
            assert t.shape[dim] == sizes[units], key


def test_an_unsupported_family_is_named_with_the_supported_ones():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="'gpt2'.*" + supported_names() + "$"):
        family_of(GPT2Config())
    assert supported_names() == ", ".join(f.name for f in FAMILIES)


def test_mlp_biases_are_refused_by_every_family():
    with pytest.raises(UnsupportedModelError, match="mlp_bias"):
        family_of(tiny_config("llama", mlp_bias=True))


def test_the_export_class_extends_the_family_class(model):
    pruned = family_of(model.config).pruned_class(model.config)
    assert pruned.__name__ == "ProbPrune" + type(model).__name__
    assert issubclass(pruned, type(model))


# A Hugging Face attribute path: the module tree of a causal LM, spelt out. The adapters hold
# these; the export's modeling file holds the Llama layout once, for exports made before it read
# them from config.json.
HF_PATH = re.compile(r"\.model\.layers\b|model\.model\b|\blm_head\.weight|\bembed_tokens\b|"
                     r"\brotary_emb\b|\binput_layernorm\b|\bpost_attention_layernorm\b|"
                     r"[\"']model\.layers|\bself_attn\.[a-z]|\.mlp\.(gate|up|down)_proj")
ALLOWED = {os.path.join("probprune", "families"), os.path.join("probprune", "modeling_probprune.py")}


def test_no_module_outside_the_adapters_names_a_hugging_face_path():
    offenders = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, "probprune")):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)
            if not f.endswith(".py") or any(rel.startswith(a) for a in ALLOWED):
                continue
            for n, line in enumerate(open(path, encoding="utf-8"), 1):
                code = line.split("#")[0]
                if HF_PATH.search(code) and not code.strip().startswith(('"', "'", "``")):
                    offenders.append(f"{rel}:{n}: {line.strip()}")
    assert not offenders, "\n".join(offenders)

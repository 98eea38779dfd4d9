"""The memory plan from configs alone: parameter counts against the published sizes and the HF
modules, the terms by hand, and a run that cannot fit stopping before it loads."""
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from probprune.config import PruneConfig
from probprune.memory import GIB, PlanError, check_fits, param_count, plan

LLAMA = {  # the LLaMA-1 family's configs (hidden, intermediate, layers, heads, kv heads)
    "7b": LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=32, vocab_size=32000),
    "13b": LlamaConfig(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                       num_attention_heads=40, num_key_value_heads=40, vocab_size=32000),
    "70b": LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8, vocab_size=32000),
}


def test_parameter_counts_are_the_published_ones():
    assert param_count(LLAMA["7b"]) == 6_738_415_616
    assert param_count(LLAMA["13b"]) == 13_015_864_320
    assert param_count(LLAMA["70b"]) == 68_976_648_192  # LLaMA-2-70B


@pytest.mark.parametrize("name", ["llama", "llama3", "qwen2", "qwen3"])
def test_parameter_count_matches_the_modules(tiny_model_dirs, name):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[name])
    assert param_count(model.config) == sum(p.numel() for p in model.parameters())


def test_meta_device_model_has_the_planned_parameters():
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(LLAMA["70b"])
    assert param_count(LLAMA["70b"]) == sum(p.numel() for p in model.parameters())


def test_terms_by_hand():
    c = LLAMA["13b"]
    p = plan(c, dtype="bfloat16", k=2, batch_size=8, seqlen=128, compensate="sequential",
             compensate_windows=128)
    tokens = 2 * 8 * 128
    assert p.terms["weights"] == 13_015_864_320 * 2
    assert p.terms["search [K/W, B, T]: hidden states x2"] == 2 * tokens * 5120 * 2
    assert p.terms["search [K/W, B, T]: widest layer intermediate"] == 3 * tokens * 13824 * 2
    assert p.terms["compensation: one float64 Gram matrix"] == 13825 ** 2 * 8
    states = 2 * 128 * 128 * 5120 * 4  # a layer's input and output stream, fp32
    assert p.terms["compensation: calibration hidden states"] == states
    dense = plan(c, dtype="bfloat16", k=2, batch_size=8, seqlen=128, compensate="sequential",
                 compensate_windows=128, compensate_target="dense")
    assert dense.terms["compensation: calibration hidden states"] == states * 3 // 2
    # Evaluation of a batch of 8 windows: chunked lm_head, never the [8, 128, 32000] logits.
    assert p.terms["evaluation [B, T]: lm_head logit chunk"] == (1 << 24) * 4 + 1024 * 5120 * 2
    assert p.peak == p.terms["weights"] + max(p.phases.values())
    # The refit-scored search: 40 layers' fp32 second moments of down_proj's and o_proj's
    # inputs with W C beside them (bf16), and one layer's solves for the 2 masks.
    refit = plan(c, dtype="bfloat16", k=2, batch_size=8, seqlen=128, search_loss="refit",
                 search_refit_windows=64)
    moments = 40 * ((13824 ** 2 + 5120 ** 2) * 4 + 5120 * (13824 + 5120) * 2)
    assert refit.terms["search refit: input second moments"] == moments
    assert refit.terms["search refit: one layer's solves"] == 2 * (2 * 13824 ** 2 +
                                                                   2 * 1024 * 13824) * 4
    assert refit.phases["search"] == p.phases["search"] + moments + refit.terms[
        "search refit: one layer's solves"]
    assert refit.phases["search refit statistics"] == moments + 2 * 64 * 128 * 5120 * 4 + \
        13825 ** 2 * 8
    # Two ranks each evaluate half the masks.
    half = plan(c, dtype="bfloat16", k=2, batch_size=8, seqlen=128, world_size=2)
    assert half.terms["search [K/W, B, T]: hidden states x2"] == tokens * 5120 * 2


def test_a_run_that_cannot_fit_names_the_flag():
    p = plan(LLAMA["7b"], dtype="float32", k=64, batch_size=64, seqlen=2048)
    with pytest.raises(PlanError, match="lower --k or --batch-size"):
        check_fits(p, "cpu", available=p.terms["weights"] + GIB)
    with pytest.raises(PlanError, match="use --dtype bfloat16"):
        check_fits(p, "cpu", available=GIB)
    check_fits(p, "cpu", available=p.peak)  # exactly enough is enough


def test_dry_run_prints_the_plan_without_loading(tiny_model_dirs, calib_file, tmp_path,
                                                 monkeypatch, capsys):
    import probprune.pipeline
    from probprune.cli import main

    def refuse(*a, **k):
        raise AssertionError("weights were loaded")
    monkeypatch.setattr(probprune.pipeline, "load_model", refuse)
    assert main(["prune", "--model", tiny_model_dirs["llama"], "--sparsity", "0.3",
                 "--calib", calib_file, "--eval", calib_file, "--out", str(tmp_path / "o"),
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("memory plan (one rank's device): peak") and "weights" in out
    assert PruneConfig(model="x", sparsity=0.3, out="o").dry_run is False

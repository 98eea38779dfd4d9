"""``probprune-fast prune --dry-run`` plans LLaMA-2-13B from its config.json alone (no weights, no
tokenizer, no GPU needed) at the paper's K, batch, seqlen and bf16: every term printed, and the
plan fits one 80 GB GPU. bench/gpu_check.sh runs the same plan (bench.estimate --plan-13b)."""
import json
from types import SimpleNamespace

import pytest

from bench.estimate import GPU_GB, PAPER, plan_13b
from probprune.cli import main
from probprune.memory import param_count


def test_llama2_13b_plan_from_config_alone_fits_80gb(tmp_path, capsys):
    r = plan_13b(str(tmp_path))
    assert r["fits"] and r["peak"] <= GPU_GB * 1e9
    config = json.loads((tmp_path / "llama-2-13b" / "config.json").read_text())
    assert (config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"],
            config["vocab_size"]) == (5120, 40, 13824, 32000)
    weights = r["terms"]["weights"]
    assert weights == 2 * param_count(SimpleNamespace(**config)) and 24e9 < weights < 27e9
    assert r["peak"] > weights and r["command"].split()[:3] == ["probprune-fast", "prune",
                                                                "--dry-run"]
    assert json.loads((tmp_path / "plan.json").read_text())["peak"] == r["peak"]

    argv = r["command"].split()[1:]
    argv.remove("--json")
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert text.startswith("memory plan (one rank's device): peak ")
    assert all(name in text for name in r["terms"])
    assert f"K {PAPER['k']}, batch {PAPER['batch_size']}" in r["setting"]

    argv.remove("--dry-run")  # a real run still needs the weights and the tokenizer
    assert main(argv) == 2
    assert "holds no weights" in capsys.readouterr().err


def test_the_estimate_counts_two_flops_per_parameter_and_the_paper_way_k_times():
    """bench.estimate's counts (docs/gpu-estimate.md): a dense token costs 2 FLOPs per matmul
    parameter plus causal attention; the paper's way reads every weight once per mask; the engine
    at keep 1 does the same FLOPs, at keep 0.5 about half of them and of the bytes."""
    from bench.estimate import forward, step
    from bench.harness.registry import llama_config, model_shape

    s = model_shape("llama-13b")
    config = llama_config("llama-13b")
    matmul = param_count(config) - s["vocab_size"] * s["hidden_size"] - \
        s["num_hidden_layers"] * 2 * s["hidden_size"] - s["hidden_size"]   # embedding, norms
    T = PAPER["seqlen"]
    attention = s["num_hidden_layers"] * 2 * 2 * s["hidden_size"] * (T + 1) / 2
    one = forward(s, T, T, 1.0)
    assert one.flops == pytest.approx(T * (2 * matmul + attention))
    dense, engine = step(s, engine=False), step(s, engine=True, keep=1.0)
    assert dense.flops == pytest.approx(engine.flops)
    weights = 2 * (matmul - s["vocab_size"] * s["hidden_size"])
    assert dense.bytes > engine.bytes > PAPER["k"] * weights
    half = step(s, engine=True)
    assert half.flops < 0.55 * dense.flops and half.bytes < 0.6 * dense.bytes

"""The scripts of examples/ run on the tiny models, and what they compute is checked against
an independent computation."""
import os
import runpy

import pytest
import torch

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name):
    return runpy.run_path(os.path.join(EXAMPLES, name), run_name="example")


def test_custom_criterion_scores_and_masked_errors_match_a_dense_computation():
    from transformers.models.llama.modeling_llama import LlamaMLP

    from tests.tiny_models import tiny_config

    ex = _example("custom_criterion.py")
    torch.manual_seed(0)
    mlp = LlamaMLP(tiny_config("llama")).eval()
    x = torch.randn(1, 40, mlp.hidden_size)
    scores = ex["channel_scores"](mlp, x[0])
    masks = ex["candidate_masks"](scores, keep=0.5, k=5, swaps=3)
    assert masks.shape == (5, mlp.intermediate_size)
    assert (masks.sum(1) == masks[0].sum()).all()  # every candidate keeps as many channels
    top = scores.argsort(descending=True)[: int(masks[0].sum())]
    assert masks[0, top].all()
    errors = ex["reconstruction_errors"](mlp, x, masks)
    with torch.no_grad():  # the oracle: the dense MLP with the pruned channels zeroed
        act = torch.nn.functional.silu(mlp.gate_proj(x[0])) * mlp.up_proj(x[0])
        dense = act @ mlp.down_proj.weight.T
        want = torch.stack([((act * m) @ mlp.down_proj.weight.T - dense).pow(2).sum()
                            / dense.pow(2).sum() for m in masks.float()])
    torch.testing.assert_close(errors, want, rtol=1e-4, atol=1e-6)


def test_custom_criterion_runs_on_a_model(tiny_model_dirs, capsys):
    out = _example("custom_criterion.py")["main"](
        ["--model", tiny_model_dirs["llama"], "--layer", "1", "--k", "4", "--tokens", "64"])
    assert out["best"] == int(out["errors"].argmin())
    assert "best: candidate" in capsys.readouterr().out


@pytest.mark.slow
def test_prune_in_python_runs_and_saves(tiny_model_dirs, calib_file, tmp_path, capsys):
    from probprune import load_pruned

    settings = dict(steps=2, k=2, batch_size=2, seqlen=24, nsamples=12, val_windows=3,
                    select_windows=3, max_windows=4, compensate_windows=6, speed_tokens=0,
                    progress=False)
    argv = ["--model", tiny_model_dirs["llama"], "--out", str(tmp_path / "saved"),
            "--set", f"calib={calib_file}", "--set", f"eval={calib_file}"]
    argv += [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]
    result = _example("prune_in_python.py")["main"](argv)
    printed = capsys.readouterr().out
    assert "pruned model says:" in printed and "saved to" in printed
    reloaded = load_pruned(str(tmp_path / "saved"))
    assert sum(p.numel() for p in reloaded.parameters()) == sum(
        p.numel() for p in result.model.parameters())

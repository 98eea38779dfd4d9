"""A whole ``probprune-fast prune`` run on a device with each kernel backend, then the export
reloaded there: its perplexity must be the masked perplexity the run measured with the engine's
kernels (no compensation, so the export is the bare slice of the mask).

The CUDA runs are marked gpu (bench/gpu_check.sh runs them); the CPU run checks the same body
here. A device bug in the export (weights sliced or written from the wrong device, a layout the
reload misreads) or a kernel that disagrees with the sliced model fails it."""
import json

import pytest
import torch

from probprune.cli import main
from probprune.data import eval_text, tokenize_joined
from probprune.evaluate import perplexity
from probprune.models import load_pruned
from tests.conftest import CUDA

SEQLEN, WINDOWS = 24, 4
# (device, backend, dtype, relative tolerance): the engine's kernels against the sliced model's
# torch forward, both in fp32 (TF32 off) or both in bf16 (kernels accumulate in fp32, torch's
# bf16 layers round between ops).
RUNS = [pytest.param("cpu", "reference", "float32", 1e-4, id="cpu-reference-fp32")] + [
    pytest.param(*p, marks=CUDA.marks, id="-".join(map(str, p[:3])))
    for p in [("cuda", "cuda", "float32", 1e-3), ("cuda", "triton", "float32", 1e-3),
              ("cuda", "reference", "float32", 1e-3), ("cuda", "cuda", "bfloat16", 1e-2),
              ("cuda", "triton", "bfloat16", 1e-2)]]


@pytest.mark.parametrize("device,backend,dtype,rtol", RUNS)
def test_prune_on_device_then_the_reloaded_export_gives_the_masked_perplexity(
        device, backend, dtype, rtol, tiny_model_dirs, calib_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", "--model", tiny_model_dirs["llama"], "--sparsity", "0.4",
                 "--out", str(out), "--steps", "3", "--k", "2", "--batch-size", "2",
                 "--seqlen", str(SEQLEN), "--calib", calib_file, "--nsamples", "8",
                 "--val-windows", "2", "--select-windows", "2", "--eval", calib_file,
                 "--max-windows", str(WINDOWS), "--eval-every", "3", "--compensate", "none",
                 "--speed-tokens", "0", "--device", device, "--backend", backend,
                 "--dtype", dtype, "--json"]) == 0
    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["device"].startswith(device)
    masked = report["perplexity"]["pruned_bare"]["ppl"]
    assert report["params"]["pruned_model_total"] < report["params"]["total"]

    model, tokenizer = load_pruned(str(out), dtype=dtype, device=device, with_tokenizer=True)
    assert all(p.device.type == device for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == report["params"]["pruned_model_total"]
    ids = tokenize_joined(tokenizer, [eval_text(calib_file).text])
    reloaded = perplexity(model, ids, seqlen=SEQLEN, max_windows=WINDOWS, progress=False)
    assert reloaded.windows == WINDOWS and torch.isfinite(torch.tensor(reloaded.ppl))
    assert reloaded.ppl == pytest.approx(masked, rel=rtol)
    assert reloaded.ppl == pytest.approx(report["perplexity"]["pruned"]["ppl"], rel=rtol)

"""Speed measurement: the counts it reports against the model's own tensors and files, decoding
of exactly N tokens, the side-by-side table, and the command's errors."""
import json
import math
import os
import statistics
import subprocess
import sys

import pytest
import torch

from probprune.cli import main
from probprune.export import export_pruned
from probprune.forward import MaskedCausalLM
from probprune.models import load_model
from probprune.speed import (Speed, check_speedup, disk_bytes, measure, measure_fresh,
                             speed_table)
from tests.test_cli import error_line
from tests.test_forward import _masks


@pytest.fixture(scope="module")
def pruned_dir(tiny_model_dirs, tmp_path_factory):
    """A tiny export with a dropped layer, and the parameters it must have by the unit costs."""
    model, tok = load_model(tiny_model_dirs["llama"])
    units = MaskedCausalLM(model, include_layers=True).units
    mask = _masks(units, 3, seed=3)[2]
    out = export_pruned(model, tok, units, mask, str(tmp_path_factory.mktemp("pruned")))
    dense = sum(p.numel() for p in model.parameters())
    return out, dense - units.prunable_params + int(units.kept_params(mask))


def test_measure_counts_the_model_and_its_files(tiny_model_dirs):
    directory = tiny_model_dirs["qwen2"]
    model, _ = load_model(directory)
    r = measure(model, "tiny", directory, batch=2, seqlen=12, new_tokens=4, repeats=2)
    assert r.params == sum(p.numel() for p in model.parameters())
    assert r.disk_bytes == os.path.getsize(os.path.join(directory, "model.safetensors"))
    buffers = sum(b.numel() for b in model.buffers())  # the rotary frequencies
    assert r.weight_bytes == 4 * (r.params + buffers)  # float32
    assert (r.batch, r.seqlen, r.new_tokens, r.repeats) == (2, 12, 4, 2)
    assert r.prefill_ms > 0 and math.isfinite(r.decode_tokens_per_s) and r.decode_tokens_per_s > 0
    assert r.peak_memory_mib is None and "not measured" in r.peak_memory_kind


def test_decode_produces_exactly_n_tokens_even_past_end_of_text(tiny_model_dirs, monkeypatch):
    """The greedy first token made the end-of-text token: without min_new_tokens, generate
    would stop after one token."""
    model, _ = load_model(tiny_model_dirs["llama"])
    from probprune.speed import random_batch

    ids = random_batch(model.config.vocab_size, 1, 10, "cpu")
    with torch.no_grad():
        first = int(model(ids).logits[0, -1].argmax())
    model.config.eos_token_id = first
    model.generation_config.eos_token_id = first
    calls = []
    original = model.generate

    def spy(*a, **k):
        out = original(*a, **k)
        calls.append(out.shape[1] - a[0].shape[1])
        return out
    monkeypatch.setattr(model, "generate", spy)
    r = measure(model, "tiny", None, seqlen=10, new_tokens=6, repeats=2)
    assert r.new_tokens == 6 and calls == [6, 6, 6]  # warm-up and two timed runs
    assert r.disk_bytes is None


def test_measure_refuses_a_single_decode_token(tiny_model_dirs):
    model, _ = load_model(tiny_model_dirs["llama"])
    with pytest.raises(ValueError, match="at least 2 new tokens"):
        measure(model, "tiny", new_tokens=1)


def test_fresh_process_measures_the_export(pruned_dir):
    out, expected_params = pruned_dir
    r = measure_fresh(out, seqlen=8, new_tokens=3, repeats=1)
    assert r.params == expected_params
    assert r.disk_bytes == os.path.getsize(os.path.join(out, "model.safetensors"))
    assert r.new_tokens == 3
    assert r.peak_memory_mib > 0 and "fresh process" in r.peak_memory_kind


def test_a_script_without_a_main_guard_measures_once(pruned_dir, tmp_path):
    """The fresh process never imports the caller's script again (a multiprocessing spawn
    would, and a script without ``if __name__ == "__main__"`` would then run twice)."""
    script = tmp_path / "script.py"
    script.write_text("from probprune.speed import measure_fresh\n"
                      f"r = measure_fresh({pruned_dir[0]!r}, seqlen=8, new_tokens=2, repeats=1)\n"
                      "print('measured', r.params)\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [f"measured {pruned_dir[1]}"]


def test_a_failure_in_the_fresh_process_is_raised_here(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        measure_fresh(str(tmp_path / "missing"), seqlen=8, new_tokens=2, repeats=1)


def test_disk_bytes_counts_weight_files_only(tmp_path):
    (tmp_path / "model-00001-of-00002.safetensors").write_bytes(b"x" * 10)
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"x" * 7)
    (tmp_path / "scores.safetensors").write_bytes(b"x" * 1000)  # a run's, not the model's
    (tmp_path / "config.json").write_text("{}")
    assert disk_bytes(str(tmp_path)) == 17
    assert disk_bytes(None) is None and disk_bytes(str(tmp_path / "missing")) is None


def test_table_puts_models_side_by_side(tiny_model_dirs, pruned_dir):
    dense_model, _ = load_model(tiny_model_dirs["llama"])
    pruned_model, _ = load_model(pruned_dir[0])
    kw = dict(seqlen=8, new_tokens=3, repeats=1)
    records = [measure(dense_model, "dense", tiny_model_dirs["llama"], **kw),
               measure(pruned_model, "pruned", pruned_dir[0], **kw)]
    lines = speed_table(records).splitlines()
    assert lines[0].split() == ["dense", "pruned"]
    params = lines[1].split()
    dense_n = sum(p.numel() for p in dense_model.parameters())
    assert params[:2] == ["parameters", f"{dense_n:,}"]
    assert params[2] == f"{pruned_dir[1]:,}" and params[3] == f"({pruned_dir[1] / dense_n:.2f}x)"
    assert lines[3].startswith("weights in memory") and lines[4].startswith("prefill 1x8 (ms)")
    assert "not measured" in lines[7]
    assert lines[8].startswith("warning (pruned): one round")  # the table says what it lacks


def test_cli_speed_json(tiny_model_dirs, pruned_dir, capsys):
    assert main(["speed", "--model", tiny_model_dirs["llama"], "--model", pruned_dir[0],
                 "--seqlen", "8", "--new-tokens", "3", "--repeats", "1", "--json"]) == 0
    records = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["model"] for r in records] == [tiny_model_dirs["llama"], pruned_dir[0]]
    assert records[1]["params"] == pruned_dir[1] and records[1]["new_tokens"] == 3


@pytest.mark.parametrize("extra,message", [
    (["--model", "{missing}"], "--model '{missing}' does not exist"),
    (["--model", "{llama}", "--model", "smollm2-13"],
     "--model 'smollm2-13' is neither a model directory"),
    (["--model", "{llama}", "--new-tokens", "1"], "--new-tokens must be at least 2, got 1"),
    (["--model", "{llama}", "--batch", "0"], "--batch must be at least 1, got 0"),
    ([], "the following arguments are required: --model"),
])
def test_cli_speed_bad_input(tiny_model_dirs, tmp_path, capsys, extra, message):
    names = {"missing": str(tmp_path / "missing"), "llama": tiny_model_dirs["llama"]}
    assert main(["speed"] + [e.format(**names) for e in extra]) == 2
    assert message.format(**names) in error_line(capsys)


def test_models_are_measured_in_turn_and_the_rounds_median_shown(monkeypatch):
    import probprune.speed as speed

    calls = []
    figures = {("a", 0): (10.0, 5.0, 100.0), ("b", 0): (4.0, 9.0, 60.0),
               ("a", 1): (30.0, 1.0, 120.0), ("b", 1): (6.0, 3.0, 50.0),
               ("a", 2): (20.0, 2.0, 110.0), ("b", 2): (5.0, 6.0, 70.0)}

    def fake(name, **kw):
        rnd = sum(c == name for c in calls)
        calls.append(name)
        prefill, rate, peak = figures[(name, rnd)]
        return speed.Speed(model=name, params=1, disk_bytes=None, weight_bytes=4, batch=1,
                           seqlen=8, new_tokens=3, repeats=1, prefill_ms=prefill,
                           decode_tokens_per_s=rate, peak_memory_mib=peak,
                           peak_memory_kind="k", device="cpu", dtype="float32")
    monkeypatch.setattr(speed, "measure_fresh", fake)
    a, b = speed.measure_in_turn(["a", "b"], rounds=3)
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert (a.prefill_ms, a.decode_tokens_per_s, a.peak_memory_mib, a.rounds) == (20, 2, 120, 3)
    assert (b.prefill_ms, b.decode_tokens_per_s, b.peak_memory_mib) == (5, 6, 70)
    assert (a.prefill_ms_rounds, b.decode_tokens_per_s_rounds) == ([10, 30, 20], [9, 3, 6])
    footer = [line for line in speed_table([a, b]).splitlines() if "prefill: median" in line]
    assert "the median of 3 rounds" in footer[0]


def timed(name, matmul, prefill, decode, head=0):
    """A Speed of ``matmul`` matrix-multiply weights (and ``head`` in the output layer) and the
    timings of each round."""
    return Speed(model=name, params=matmul + head, disk_bytes=None,
                 weight_bytes=4 * (matmul + head), batch=1, seqlen=128, new_tokens=32, repeats=3,
                 prefill_ms=statistics.median(prefill),
                 decode_tokens_per_s=statistics.median(decode), peak_memory_mib=None,
                 peak_memory_kind="k", device="cpu", dtype="float32", rounds=len(prefill),
                 matmul_params=matmul, head_params=head,
                 prefill_ms_rounds=prefill if len(prefill) > 1 else None,
                 decode_tokens_per_s_rounds=decode if len(decode) > 1 else None)


def test_a_speedup_the_flops_explain_passes_without_a_warning():
    dense = timed("dense", 100, [250.0, 249.0, 251.0], [17.0, 17.2, 17.1])
    pruned = timed("pruned", 76, [212.0, 213.0, 211.0], [20.9, 21.0, 20.8])
    check = check_speedup(dense, pruned)
    assert check.warnings == []
    assert check.prefill_speedup == pytest.approx(250 / 212)
    assert check.decode_speedup == pytest.approx(20.9 / 17.1)
    assert check.prefill_flop_ratio == check.decode_flop_ratio == pytest.approx(100 / 76)
    assert check.spread == pytest.approx(0.2 / 17.1)


def test_the_output_layer_counts_once_in_a_prefill_and_fully_in_a_decode_step():
    # SmolLM2-135M at 30%: 106.2 M decoder weights -> 74.4 M, the 28.3 M lm_head unpruned
    dense = timed("dense", 106_200_000, [456.0, 450.0, 458.0], [15.9, 16.0, 15.8], 28_300_000)
    pruned = timed("pruned", 74_400_000, [318.7, 320.0, 318.0], [21.5, 21.4, 21.6], 28_300_000)
    check = check_speedup(dense, pruned)
    assert check.prefill_flop_ratio == pytest.approx((106.2 * 128 + 28.3) / (74.4 * 128 + 28.3))
    assert check.decode_flop_ratio == pytest.approx(134.5 / 102.7)
    assert check.warnings == []  # 1.43x prefill, 1.35x decode: both within their bounds


def test_a_speedup_beyond_the_flops_is_called_out():
    # the report of a run while other work shared the machine: 998 -> 226 ms for 24% fewer weights
    dense = timed("dense", 100, [998.0, 990.0, 1001.0], [6.0, 6.1, 6.0])
    pruned = timed("pruned", 76, [226.0, 228.0, 225.0], [19.2, 19.0, 19.1])
    warnings = check_speedup(dense, pruned).warnings
    assert len(warnings) == 2
    assert warnings[0].startswith("prefill 4.42x faster is more than the 1.32x")
    assert warnings[1].startswith("decode 3.18x faster is more than the 1.32x")
    assert "--model dense --model pruned --rounds 5" in warnings[0]


def test_timings_that_vary_between_rounds_or_a_single_round_are_called_out():
    dense = timed("dense", 100, [250.0, 400.0, 260.0], [17.0, 17.2, 17.1])
    pruned = timed("pruned", 76, [212.0, 213.0, 211.0], [20.9, 21.0, 20.8])
    warnings = check_speedup(dense, pruned).warnings
    assert len(warnings) == 1 and "varied by up to 58% between rounds" in warnings[0]
    once = check_speedup(timed("dense", 100, [250.0], [17.0]), timed("p", 76, [212.0], [20.9]))
    assert once.spread is None and once.warnings[0].startswith("one round")
    assert "warning (p): one round" in speed_table([timed("dense", 100, [250.0], [17.0]),
                                                    timed("p", 76, [212.0], [20.9])])

"""The model card of an export: Hugging Face metadata that parses, a per-layer table that is the
mask's, the run's perplexities with their protocol, and the speed a run records."""
import json
import os

import pytest
import yaml
from safetensors.torch import load_file

from probprune.export import export_pruned
from probprune.forward import MaskedCausalLM
from probprune.model_card import render
from probprune.models import load_model
from probprune.pipeline import prune
from tests.test_forward import _masks
from tests.test_pipeline import settings


def split_card(text: str):
    """(front matter as parsed YAML, the markdown after it)."""
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


def table_rows(body: str, header: str) -> list:
    """The cells of the markdown table under ``header`` (its header and rule lines skipped)."""
    lines = body[body.index(header):].splitlines()[2:]
    return [[c.strip() for c in line.strip("|").split("|")]
            for line in lines[: next(i for i, s in enumerate(lines + [""]) if not s)]]


def mask_counts(mask, n_layers, kv, channels):
    """Per layer (kept, KV groups, query heads, channels) read off a KV-group mask by hand: heads
    [L*kv], then channels [L*F], then (with layer units) layers [L]; 3 query heads per group."""
    layer_units = mask.numel() > n_layers * (kv + channels)
    rows = []
    for l in range(n_layers):
        kept = bool(mask[n_layers * (kv + channels) + l]) if layer_units else True
        h = int(mask[l * kv:(l + 1) * kv].sum())
        c = int(mask[n_layers * kv + l * channels: n_layers * kv + (l + 1) * channels].sum())
        rows.append((kept, h if kept else 0, 3 * h if kept else 0, c if kept else 0))
    return rows


@pytest.fixture(scope="module")
def run(tiny_model_dirs, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("card") / "run"
    report = prune(settings(tiny_model_dirs["qwen2"], calib_file, out, steps=2, speed_tokens=3, speed_rounds=2,
                            compensate="parallel", compensate_windows=4))
    return str(out), report


def test_run_card_metadata_and_table(run):
    out, report = run
    meta, body = split_card(open(os.path.join(out, "README.md")).read())
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"pruned", "probprune"} <= set(meta["tags"])
    assert "base_model" not in meta  # a local directory has no Hub id
    mask = load_file(os.path.join(out, "masks.safetensors"))["mask"]
    rows = table_rows(body, "| layer | status |")
    expected = mask_counts(mask, 3, 2, 72)
    assert [(int(r[0]), r[1] == "kept", int(r[2]), int(r[3]), int(r[4])) for r in rows] == [
        (l, *e) for l, e in enumerate(expected)]
    assert f"| this model | {report['params']['pruned_model_total']:,} |" in body


def test_run_card_perplexities_and_protocol(run):
    out, report = run
    _, body = split_card(open(os.path.join(out, "README.md")).read())
    ppl = report["perplexity"]
    rows = dict((r[0], float(r[1])) for r in table_rows(body, "| model | perplexity |"))
    lost = {  # the search's best mask, when the init won the selection
        "the search's best mask, bare slice (not exported: lost after compensation)":
            round(ppl["search_bare"]["ppl"], 3),
        "the search's best mask, compensated (not exported)":
            round(ppl["search_compensated"]["ppl"], 3)} if "search_bare" in ppl else {}
    assert rows == {"base model (dense)": round(ppl["dense"]["ppl"], 3),
                    "initial mask (bare slice)": round(ppl["init"]["ppl"], 3),
                    "initial mask, compensated": round(ppl["init_compensated"]["ppl"], 3),
                    **lost,
                    "this model's mask (bare slice)": round(ppl["pruned_bare"]["ppl"], 3),
                    "this model (the export, reloaded)": round(ppl["pruned"]["ppl"], 3)}
    dense = ppl["dense"]
    assert (f"non-overlapping windows of {dense['seqlen']} tokens ({dense['windows']} windows); "
            f"perplexity = exp of the mean next-token NLL over {dense['tokens']} predicted "
            f"tokens") in body
    assert "`compensate`: `parallel`" in body
    settings_json = body[body.index("```json") + 7: body.index("```", body.index("```json") + 7)]
    assert json.loads(settings_json) == report["settings"]


def test_run_records_the_speed_of_its_export(run):
    out, report = run
    speed = report["speed"]
    assert speed["pruned"]["params"] == report["params"]["pruned_model_total"]
    assert speed["dense"]["params"] == report["params"]["total"]
    assert speed["pruned"]["disk_bytes"] == os.path.getsize(os.path.join(out, "model.safetensors"))
    assert speed["pruned"]["new_tokens"] == speed["dense"]["new_tokens"] == 3
    assert speed["pruned"]["seqlen"] == report["settings"]["seqlen"]
    # measured as `speed` measures: two rounds, the models in turn, each round's figure kept
    assert speed["dense"]["rounds"] == speed["pruned"]["rounds"] == 2
    assert len(speed["pruned"]["prefill_ms_rounds"]) == 2
    check = speed["check"]
    assert check["prefill_speedup"] == speed["dense"]["prefill_ms"] / speed["pruned"]["prefill_ms"]
    d, p = speed["dense"], speed["pruned"]
    assert check["decode_flop_ratio"] == pytest.approx(
        (d["matmul_params"] + d["head_params"]) / (p["matmul_params"] + p["head_params"]))
    assert d["head_params"] == p["head_params"] == 320 * 48  # the tiny vocabulary x width
    _, body = split_card(open(os.path.join(out, "README.md")).read())
    assert "## Speed" in body and "decode 3 greedy tokens" in body
    assert all(f"Caution: {w}" in body for w in check["warnings"])


def test_a_run_writes_its_card_once_with_its_figures(tiny_model_dirs, calib_file, tmp_path,
                                                      monkeypatch):
    import probprune.model_card as model_card

    cards, render_card = [], model_card.render
    monkeypatch.setattr(model_card, "render",
                        lambda *a, **kw: cards.append(kw) or render_card(*a, **kw))
    report = prune(settings(tiny_model_dirs["llama"], calib_file, tmp_path / "run", steps=2,
                            speed_tokens=0))
    assert len(cards) == 1 and cards[0]["perplexities"] == report["perplexity"]


def test_card_of_an_export_with_a_dropped_layer(tiny_model_dirs, tmp_path):
    model, tok = load_model(tiny_model_dirs["llama"])
    units = MaskedCausalLM(model, include_layers=True).units
    mask = _masks(units, 3, seed=3)[2]
    out = export_pruned(model, tok, units, mask, str(tmp_path))  # no settings, no figures
    meta, body = split_card(open(os.path.join(out, "README.md")).read())
    assert "base_model" not in meta and "## Evaluation" not in body and "## Speed" not in body
    rows = table_rows(body, "| layer | status |")
    expected = mask_counts(mask, 3, 2, 72)
    assert [r[1] for r in rows] == ["kept" if k else "dropped" for k, _, _, _ in expected]
    assert "dropped" in [r[1] for r in rows]
    assert [(int(r[2]), int(r[3]), int(r[4])) for r in rows] == [(h, q, c) for _, h, q, c in expected]
    # the load snippet names the directory it is in
    assert f'load_pruned("{os.path.basename(out)}", with_tokenizer=True)' in body


@pytest.mark.parametrize("model,base,license", [
    ("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    ("some-org/some-model", "some-org/some-model", None),
])
def test_front_matter_names_the_hub_base_model(model, base, license):
    manifest = {"settings": {"model": model, "sparsity": 0.3}, "original_num_layers": 1,
                "kept": {"layers": [0], "kv_heads": {"0": [0]}, "channels": {"0": [1, 2]}},
                "kept_params": 10.0, "prunable_params": 20}
    config = {"num_key_value_heads": 2, "num_attention_heads": 4, "intermediate_size": 4}
    meta, body = split_card(render(manifest, config, name="x"))
    assert meta["base_model"] == base and meta.get("license") == license
    # a manifest without q_heads (written before query-head units): whole groups of 2
    assert table_rows(body, "| layer | status |") == [["0", "kept", "1", "2", "2"]]
    assert "50.0% of its prunable parameters" in body

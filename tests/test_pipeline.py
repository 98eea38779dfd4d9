"""A whole pruning run on a tiny model: outputs, resume, and the errors users hit first."""
import json

import pytest
import torch
from safetensors.torch import load_file

from probprune.checkpoint import CHECKPOINT, RunCheckpoint
from probprune.cli import main
from probprune.compensate import input_grams
from probprune.config import PruneConfig
from probprune.data import DataError, calibration_texts, tokenize_joined
from probprune.evaluate import masked_nll, model_nll
from probprune.forward import MaskedCausalLM
from probprune.models import load_model, load_pruned
from probprune.pipeline import StopRequested, calibration, prune


def settings(model_dir, calib, out, **kw):
    base = dict(model=model_dir, sparsity=0.3, out=str(out), steps=8, k=3, batch_size=2,
                seqlen=24, calib=calib, nsamples=12, val_windows=3, eval=calib,
                max_eval_windows=6, eval_every=2, checkpoint_every=2, progress=False, seed=3,
                compensate="none", speed_tokens=0)
    base.update(kw)
    return PruneConfig(**base)


def test_run_writes_everything_and_reload_matches(tiny_model_dirs, calib_file, tmp_path):
    report = prune(settings(tiny_model_dirs["qwen2"], calib_file, tmp_path / "run"))
    out = tmp_path / "run"
    for name in ("report.json", "masks.safetensors", "scores.safetensors", "model.safetensors",
                 "config.json", "probprune.json", "modeling_probprune.py",
                 "kept_per_layer.png", "score_histogram.png", "loss_curve.png"):
        assert (out / name).exists(), name
    ppl = report["perplexity"]
    # Without compensation the reloaded smaller model gives the masked evaluation's perplexity.
    assert ppl["pruned"]["ppl"] == pytest.approx(ppl["pruned_bare"]["ppl"], rel=1e-4)
    params = report["params"]
    assert params["kept_prunable"] <= params["target_prunable"]
    assert len(report["layers"]) == 3 and report["median_step_s"] > 0
    assert json.load(open(out / "report.json"))["settings"]["k"] == 3


def test_the_exported_mask_is_the_best_one_seen(tiny_model_dirs, calib_file, tmp_path):
    """The mask written out is the one with the lowest held-out loss among the init's and those
    scored during the search, and its loss recomputed from the files is the reported one."""
    cfg = settings(tiny_model_dirs["llama"], calib_file, tmp_path / "run", steps=10, lr=0.5)
    report = prune(cfg)
    held_out = json.load(open(tmp_path / "run" / "report.json"))["val_loss"]
    scored = [(0, held_out["init"])] + [(h["step"], h["val_loss"]) for h in held_out["history"]]
    best_step, best = min(scored, key=lambda sv: sv[1])
    assert len(scored) == 6 and len({v for _, v in scored}) > 1  # the search moved the mask
    assert report["val_loss"]["best_step"] == best_step
    assert report["val_loss"]["best"] == pytest.approx(best, rel=1e-12)
    model, tok = load_model(cfg.model)
    mask = load_file(str(tmp_path / "run" / "masks.safetensors"))["mask"].bool()
    val = calibration(tok, cfg).val
    recomputed = masked_nll(MaskedCausalLM(model), mask, val, cfg.batch_size)
    assert recomputed == pytest.approx(best, rel=1e-6)


def test_search_selection_and_training_windows_never_overlap(tiny_model_dirs, tmp_path):
    """The steps' pool, the search's held-out windows and the selection's come from disjoint
    stretches of the text, in that order: the compensated masks compete on text that neither
    trained the search nor picked its best mask."""
    text = tmp_path / "count.txt"
    text.write_text(" ".join(str(i) for i in range(6000)) + "\n")  # every window is unique
    cfg = settings(tiny_model_dirs["llama"], str(text), tmp_path / "run", nsamples=40,
                   val_windows=20, select_windows=30)
    model, tok = load_model(cfg.model)
    data = calibration(tok, cfg)
    ids = tokenize_joined(tok, calibration_texts(cfg.calib))
    spans = ids.unfold(0, cfg.seqlen, 1)

    def starts(windows):
        hits = (spans[None] == windows[:, None]).all(-1).nonzero()
        assert hits[:, 0].tolist() == list(range(len(windows)))  # each found, exactly once
        return hits[:, 1]

    pool, val, select = starts(data.pool), starts(data.val), starts(data.select)
    assert (len(pool), len(val), len(select)) == (40, 20, 30)
    assert pool.max() + cfg.seqlen <= val.min() and val.max() + cfg.seqlen <= select.min()


TIMINGS = {"median_step_s", "peak_memory_mib", "model_load_s", "wall_s", "seconds", "speed",
           "step_times"}
RUN_DIRECTORY = {"out", "resume", "stop_after"}  # settings that name the run, not its result


def same(a, b, where="") -> None:
    """Asserts two report or checkpoint trees are equal bit for bit (tensors and NaNs too)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}/{i}")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert type(a) is type(b) and a == b, f"{where}: {a!r} != {b!r}"


def result_of_run(tree):
    """A report's or checkpoint's tree without what differs between two runs of one search:
    timings, and the settings that name the run directory."""
    if isinstance(tree, list):
        return [result_of_run(v) for v in tree]
    if not isinstance(tree, dict):
        return tree
    return {k: ({s: v for s, v in tree[k].items() if s not in RUN_DIRECTORY} if k == "settings"
                else result_of_run(v)) for k, v in tree.items() if k not in TIMINGS}


@pytest.mark.parametrize("block,extra", [
    (1, {}), (5, {}),
    (5, dict(k=4, antithetic=True, control_variate=True, cv_history=8, optimizer="adam")),
    (1, dict(search_loss="refit", search_refit_windows=6)),
    (1, dict(compensate="sequential", compensate_windows=8, select_candidates=3, lr=0.5))])
def test_resume_reproduces_the_uninterrupted_run(tiny_model_dirs, calib_file, tmp_path, block,
                                                 extra):
    model = tiny_model_dirs["llama"]
    full = prune(settings(model, calib_file, tmp_path / "full", channel_block=block, **extra))
    with pytest.raises(StopRequested):  # killed after step 5
        prune(settings(model, calib_file, tmp_path / "cut", stop_after=5, channel_block=block,
                       **extra))
    # The checkpoint of step 4 is the last one; the resumed run replays step 5 identically.
    resumed = prune(settings(model, calib_file, tmp_path / "cut", resume=True,
                             channel_block=block, **extra))
    for name in ("scores.safetensors", "masks.safetensors", "model.safetensors"):
        a, b = (load_file(str(tmp_path / run / name)) for run in ("full", "cut"))
        same(a, b, name)
    # every figure of the report but the timings, and the final checkpoint, bit for bit
    same(result_of_run(full), result_of_run(resumed))
    same(result_of_run(json.load(open(tmp_path / "cut" / "report.json"))), result_of_run(resumed))
    a, b = (RunCheckpoint.load(str(tmp_path / run / CHECKPOINT)).to_tree()
            for run in ("full", "cut"))
    same(result_of_run(a), result_of_run(b))
    assert resumed["steps_timed"] == 8 and len(b["step_times"]) == 8
    assert b["policy"]["step"] == 8 and b["history"][-1]["step"] == 8
    if "select_candidates" in extra:  # the candidates went through the checkpoint and competed
        assert len(b["candidates"]) == 3 and len(resumed["selection"]) >= 3
    explained = full["search"]["cv_explained"]
    assert (explained is None) == (not extra.get("control_variate"))
    assert explained is None or explained <= 1


def test_a_refit_scored_search_ranks_refit_losses_and_reports_bare_slices(tiny_model_dirs,
                                                                         calib_file, tmp_path):
    cfg = settings(tiny_model_dirs["llama"], calib_file, tmp_path / "run", steps=6,
                   search_loss="refit", search_refit_windows=6)
    report = prune(cfg)
    ppl = report["perplexity"]
    # No compensation at export: the reloaded model is the bare slice the report says it is.
    assert ppl["pruned"]["ppl"] == pytest.approx(ppl["pruned_bare"]["ppl"], rel=1e-4)
    model, tok = load_model(cfg.model)
    data = calibration(tok, cfg)
    mask = load_file(str(tmp_path / "run" / "masks.safetensors"))["mask"].bool()
    engine = MaskedCausalLM(model)
    bare = masked_nll(engine, mask, data.val, cfg.batch_size)
    engine.use_refits(input_grams(engine, data.pool[:6], cfg.eval_batch_size, False),
                      cfg.compensate_damping)
    refit = masked_nll(engine, mask, data.val, cfg.batch_size)
    assert report["val_loss"]["best"] == pytest.approx(refit, rel=1e-5)
    assert abs(refit - bare) > 1e-4


def test_resume_refuses_changed_settings(tiny_model_dirs, calib_file, tmp_path):
    with pytest.raises(StopRequested):
        prune(settings(tiny_model_dirs["llama"], calib_file, tmp_path, stop_after=2))
    with pytest.raises(ValueError, match=r"settings differ .* sparsity \(0.3 there, 0.5 now\)"):
        prune(settings(tiny_model_dirs["llama"], calib_file, tmp_path, sparsity=0.5, resume=True))


@pytest.mark.parametrize("kw,error,message", [
    (dict(sparsity=1.2), ValueError, "strictly between 0 and 1"),
    (dict(sparsity=0.0), ValueError, "strictly between 0 and 1"),
    (dict(k=1), ValueError, "leave-one-out baseline needs --k 2"),
    (dict(nsamples=5000), DataError, "5000 \\+ 3 windows of 24 need"),
    (dict(protect_layers=[0, 1, 2]), ValueError, "budget cannot be met"),
    (dict(channel_block=0), ValueError, "--channel-block must be at least 1"),
])
def test_errors(tiny_model_dirs, calib_file, tmp_path, kw, error, message):
    with pytest.raises(error, match=message):
        prune(settings(tiny_model_dirs["llama"], calib_file, tmp_path, **kw))


def test_unsupported_model(tmp_path, calib_file):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(tmp_path)
    # Refused before any weight is read, by the settings check.
    with pytest.raises(ValueError, match="Llama, Mistral, Qwen2"):
        prune(settings(str(tmp_path), calib_file, tmp_path / "out"))


def test_cli_prune_then_eval_the_pruned_directory(tiny_model_dirs, calib_file, tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["prune", "--model", tiny_model_dirs["mistral"], "--sparsity", "0.4", "--out", out,
            "--steps", "4", "--k", "2", "--batch-size", "2", "--seqlen", "24", "--calib",
            calib_file, "--nsamples", "8", "--val-windows", "2", "--eval", calib_file,
            "--max-windows", "4", "--device", "cpu", "--json", "--prune-layers"]
    assert main(args) == 0
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["kept_prunable"] <= 0.6 * record["prunable"] + 1e-6
    assert main(["eval", "--model", out, "--data", calib_file, "--seqlen", "24",
                 "--max-windows", "4", "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert again["ppl"] == pytest.approx(record["pruned_ppl"], rel=1e-5)


def test_compensated_run_reports_bare_and_compensated_perplexities(tiny_model_dirs, calib_file,
                                                                    tmp_path):
    report = prune(settings(tiny_model_dirs["llama"], calib_file, tmp_path / "run",
                            compensate="sequential", compensate_windows=8,
                            window_stride=2))
    ppl = report["perplexity"]
    for name in ("dense", "init", "init_compensated", "pruned_bare", "pruned"):
        assert ppl[name]["stride"] == 2 and ppl[name]["windows"] == ppl["dense"]["windows"], name
    assert ppl["pruned"]["ppl"] != pytest.approx(ppl["pruned_bare"]["ppl"], rel=1e-4)
    comp = report["compensation"]  # the bias is fitted by default
    assert (comp["mode"], comp["bias"], comp["windows"]) == ("sequential", True, 8)
    for rec in comp["layers"]:
        assert rec["mlp_refit"] <= rec["mlp_bare"] + 1e-9
    layout = json.load(open(tmp_path / "run" / "config.json"))["probprune_layout"]
    assert all(s.get("down_bias") for s in layout)


def test_selection_exports_the_candidate_best_after_compensation(tiny_model_dirs, calib_file,
                                                                 tmp_path):
    cfg = settings(tiny_model_dirs["llama"], calib_file, tmp_path / "run", steps=10, lr=0.5,
                   compensate="sequential", compensate_windows=8, select_candidates=3)
    report = prune(cfg)
    sel = report["selection"]
    held_out = report["val_loss"]
    # the three best bare masks, lowest first, and the init mask after them when not among them
    top = [c for c in sel[:3]]
    assert [c["val_loss"] for c in top] == sorted(c["val_loss"] for c in top)
    assert len(sel) == 3 + (not any(c["step"] == 0 for c in top))
    assert any(c["step"] == 0 and c["val_loss"] == held_out["init"] for c in sel)
    scored = sorted([held_out["init"]] + [h["val_loss"] for h in held_out["history"]])
    assert sel[0]["val_loss"] == pytest.approx(scored[0], rel=1e-12)  # the bare best is among them
    chosen = [c for c in sel if c["chosen"]]
    assert len(chosen) == 1
    assert chosen[0]["select_loss_compensated"] == min(c["select_loss_compensated"] for c in sel)
    # The export is that mask with that compensation: its reloaded held-out loss is the chosen one.
    _, tok = load_model(cfg.model)
    reloaded = load_pruned(str(tmp_path / "run"))
    assert model_nll(reloaded, calibration(tok, cfg).select, cfg.batch_size) == pytest.approx(
        chosen[0]["select_loss_compensated"], rel=1e-5)


def test_the_init_mask_competes_after_compensation(tiny_model_dirs, calib_file, tmp_path):
    """The search scores bare slices; after compensation the init may be better, so it competes
    on the held-out windows, and the export is never worse than it there."""
    cfg = settings(tiny_model_dirs["llama"], calib_file, tmp_path / "run", steps=10, lr=0.5,
                   compensate="sequential", compensate_windows=8)
    report = prune(cfg)
    sel = report["selection"]
    held_out = report["val_loss"]
    assert held_out["best_step"] != 0  # the search found a bare mask better than the init
    assert [(c["step"], c["val_loss"]) for c in sel] == [
        (held_out["best_step"], pytest.approx(held_out["best"], rel=1e-12)),
        (0, pytest.approx(held_out["init"], rel=1e-12))]
    chosen = next(c for c in sel if c["chosen"])
    assert chosen["select_loss_compensated"] == min(c["select_loss_compensated"] for c in sel)
    _, tok = load_model(cfg.model)
    reloaded = load_pruned(str(tmp_path / "run"))
    assert model_nll(reloaded, calibration(tok, cfg).select, cfg.batch_size) == pytest.approx(
        chosen["select_loss_compensated"], rel=1e-5)


def test_the_searchs_mask_is_measured_when_the_init_is_exported(tiny_model_dirs, calib_file,
                                                                tmp_path, monkeypatch):
    """The same search twice, the selection rigged once for each side: when the init is
    exported, the report still gives the search's best mask bare and compensated, and they
    are the figures of the run that exported that mask."""
    import probprune.selection as selection
    from probprune.cli import prune_record

    def run(name, losses):
        scores = iter(losses)  # the selection scores the best bare mask first, then the init
        monkeypatch.setattr(selection, "model_nll", lambda *a, **k: next(scores))
        return prune(settings(tiny_model_dirs["llama"], calib_file, tmp_path / name, steps=10,
                              lr=0.5, compensate="sequential", compensate_windows=8))

    searched = run("searched", [1.0, 2.0])
    assert searched["val_loss"]["best_step"] != 0  # the search beat the init: two competitors
    assert "search_bare" not in searched["perplexity"]  # the export is the search's mask
    init = run("init", [2.0, 1.0])
    ppl, exported = init["perplexity"], searched["perplexity"]
    assert next(c for c in init["selection"] if c["chosen"])["step"] == 0
    assert ppl["search_bare"]["ppl"] == pytest.approx(exported["pruned_bare"]["ppl"], rel=1e-6)
    # in memory here, reloaded from its export there
    assert ppl["search_compensated"]["ppl"] == pytest.approx(exported["pruned"]["ppl"], rel=1e-5)
    assert ppl["pruned"]["ppl"] == pytest.approx(ppl["init_compensated"]["ppl"], rel=1e-5)
    assert ppl["pruned_bare"]["ppl"] == pytest.approx(ppl["init"]["ppl"], rel=1e-6)
    # prune --json: the search's figures when the init was exported, null when not
    assert prune_record("init", init)["search_compensated_ppl"] == ppl["search_compensated"]["ppl"]
    assert prune_record("init", init)["search_bare_ppl"] == ppl["search_bare"]["ppl"]
    assert prune_record("searched", searched)["search_bare_ppl"] is None

"""``probprune-fast compare``: the quality table of several runs, read from their report.json."""
import json
import statistics

import pytest

from probprune.cli import main
from probprune.compare import compare, markdown
from tests.test_cli import prune_args

PROTOCOL = {"seqlen": 128, "stride": 16, "windows": 149, "tokens": 18923, "bos": False}


def write_run(path, *, seed, sparsity=0.3, ppl=None, chosen_step=40, best_step=None,
              protocol=None, selection=True, **settings):
    """A report.json shaped like the pipeline's, with the given perplexities."""
    ppl = ppl or {}
    path.mkdir(parents=True)
    record = {**PROTOCOL, **(protocol or {})}
    report = {
        "settings": {"model": "smollm2-135m", "sparsity": sparsity, "seed": seed, "steps": 150,
                     "compensate": "sequential", "out": str(path), "device": "cpu",
                     "progress": True, **settings},
        "eval_data": "wikitext2",
        "params": {"pruned_model_total": 100_000_000},
        "perplexity": {stage: {**record, "ppl": value} for stage, value in ppl.items()},
        "val_loss": {"best_step": chosen_step if best_step is None else best_step},
    }
    if selection:  # candidates competed after compensation
        other = best_step if best_step not in (None, chosen_step) else 0 if chosen_step else 50
        report["selection"] = [{"step": chosen_step, "chosen": True},
                               {"step": other, "chosen": False}]
    (path / "report.json").write_text(json.dumps(report))
    return str(path)


def ppl(dense, init, init_comp, bare, export):
    return {"dense": dense, "init": init, "init_compensated": init_comp, "pruned_bare": bare,
            "pruned": export}


def test_runs_alike_but_for_their_seed_make_one_group_with_its_mean_and_sd(tmp_path):
    runs = [write_run(tmp_path / "a", seed=0, ppl=ppl(56.0, 199.0, 146.0, 189.0, 144.0)),
            write_run(tmp_path / "b", seed=1, ppl=ppl(56.0, 201.0, 150.0, 185.0, 140.0),
                      device="cuda", out="elsewhere"),
            write_run(tmp_path / "c", seed=0, sparsity=0.5, chosen_step=0,
                      ppl=ppl(56.0, 600.0, 300.0, 600.0, 300.0))]
    c = compare(runs)
    assert [[r.run for r in g] for g in c.groups] == [runs[:2], runs[2:]]
    assert c.varied == ["sparsity"]  # seed, out and device do not split a group
    mean = c.as_dict()["groups"][0]["mean"]
    # by hand: the mean of 144 and 140 is 142; the sample sd is |144 - 140| / sqrt(2)
    assert mean["pruned"] == pytest.approx([142.0, 4 / 2 ** 0.5])
    assert mean["init_compensated"] == pytest.approx([148.0, statistics.stdev([146.0, 150.0])])
    assert c.as_dict()["groups"][1]["mean"]["pruned"] == [300.0, 0.0]
    table = markdown(c)
    assert "seqlen 128, 149 windows, every 16th, 18,923 predicted tokens" in table
    assert "the groups differ in: sparsity" in table
    # columns: dense, init, init + comp, search, search + comp, export (the search's mask here)
    assert (f"| {runs[0]} | 0.3 | 0 | 56.00 | 199.00 | 146.00 | 189.00 | 144.00 | 144.00 | "
            f"search step 40 |") in table
    assert "**142.00 +- 2.83**" in table
    # the search never beat its init: the search's mask is the init's
    assert (f"| {runs[2]} | 0.5 | 0 | 56.00 | 600.00 | 300.00 | 600.00 | 300.00 | 300.00 | "
            f"init |") in table
    assert table.count("mean +- sd") == 1  # not for a group of one run


def test_the_exported_mask_is_named_with_or_without_a_selection(tmp_path):
    runs = [write_run(tmp_path / "a", seed=0, chosen_step=0, ppl=ppl(56, 199, 146, 199, 146)),
            write_run(tmp_path / "b", seed=1, chosen_step=0, selection=False,
                      ppl=ppl(56, 199, 146, 199, 146)),
            write_run(tmp_path / "c", seed=2, chosen_step=100, selection=False,
                      ppl=ppl(56, 199, 146, 190, 144))]
    assert [r.chosen for r in compare(runs).groups[0]] == ["init", "init", "search step 100"]


def test_a_setting_that_moves_the_perplexity_splits_the_group(tmp_path):
    runs = [write_run(tmp_path / "free", seed=0, shape="free", ppl=ppl(56, 199, 146, 189, 144)),
            write_run(tmp_path / "uniform", seed=0, shape="uniform",
                      ppl=ppl(56, 199, 150, 195, 149))]
    c = compare(runs)
    assert len(c.groups) == 2 and c.varied == ["shape"]


def test_runs_without_compensation_leave_its_column_out(tmp_path):
    bare = {"dense": 56.0, "init": 199.0, "pruned_bare": 189.0, "pruned": 189.0}
    c = compare([write_run(tmp_path / "a", seed=0, ppl=bare, compensate="none", selection=False),
                 write_run(tmp_path / "b", seed=1, ppl=bare, compensate="none", selection=False)])
    mean = c.as_dict()["groups"][0]["mean"]
    assert mean["init_compensated"] is None and mean["search_compensated"] is None
    assert mean["search_bare"] == [189.0, 0.0]
    assert "init + comp" not in markdown(c) and "search + comp" not in markdown(c)


def test_a_search_that_lost_to_the_init_keeps_its_own_columns(tmp_path):
    lost = {**ppl(56, 199, 146, 199, 146), "search_bare": 185.0, "search_compensated": 150.0}
    c = compare([write_run(tmp_path / "new", seed=0, chosen_step=0, best_step=40, ppl=lost),
                 # a report written before the search's figures were measured: unknown, not the
                 # export's (which are the init's)
                 write_run(tmp_path / "old", seed=1, chosen_step=0, best_step=40,
                           ppl=ppl(56, 199, 146, 199, 146))])
    new, old = c.groups[0]
    assert (new.chosen, old.chosen) == ("init", "init")
    assert (new.ppl["search_bare"], new.ppl["search_compensated"]) == (185.0, 150.0)
    assert (old.ppl["search_bare"], old.ppl["search_compensated"]) == (None, None)
    assert c.as_dict()["groups"][0]["mean"]["search_bare"] is None  # not a mean of one


def test_different_protocols_are_refused_naming_each(tmp_path):
    a = write_run(tmp_path / "a", seed=0, ppl=ppl(56, 199, 146, 189, 144))
    b = write_run(tmp_path / "b", seed=1, ppl=ppl(45, 160, 120, 160, 120),
                  protocol={"bos": True, "windows": 144, "tokens": 18288})
    with pytest.raises(ValueError, match="different protocols") as e:
        compare([a, b])
    assert "no BOS token" in str(e.value) and "a BOS token" in str(e.value)
    assert a in str(e.value) and b in str(e.value)


def test_bad_run_folders_get_one_line_errors(tmp_path, capsys):
    a = write_run(tmp_path / "a", seed=0, ppl=ppl(56, 199, 146, 189, 144))
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "report.json").write_text("{")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "report.json").write_text(json.dumps(
        {"settings": {}, "params": {}, "perplexity": {"dense": {}}}))
    for runs, message in (([a, str(tmp_path / "empty")], "holds no report.json"),
                          ([str(tmp_path / "partial")], "no perplexity.pruned_bare, perplexity.pruned"),
                          ([a, a + "/"], "given more than once"),
                          ([str(tmp_path / "broken")], "not valid JSON")):
        assert main(["compare", *runs]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_compare_reads_what_the_runs_printed(tiny_model_dirs, calib_file, tmp_path, capsys):
    """Two real runs that differ in their seed: compare's rows are the figures each run
    printed, and its mean is theirs."""
    printed = []
    for seed in (0, 1):
        out = str(tmp_path / f"s{seed}")
        args = prune_args(tiny_model_dirs["llama"], {"text": calib_file}, out, "--seed", str(seed))
        assert main([*args, "--json"]) == 0
        printed.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert main(["compare", str(tmp_path / "s0"), str(tmp_path / "s1"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    (group,) = result["groups"]
    for row, run in zip(group["runs"], printed):
        assert row["ppl"]["dense"] == run["dense_ppl"]
        assert row["ppl"]["pruned"] == run["pruned_ppl"]
        assert row["ppl"]["init"] == run["init_ppl"]
        assert row["ppl"]["init_compensated"] == run["init_compensated_ppl"]
    assert group["mean"]["pruned"][0] == pytest.approx(
        statistics.mean(r["pruned_ppl"] for r in printed))


def test_seed_runs_resume_a_killed_run_skip_finished_ones_and_compare_them(
        tiny_model_dirs, calib_file, tmp_path):
    """bench/seed_runs.sh: started again after a kill, it resumes the killed run from its
    checkpoint, starts the missing one, and a third start only rebuilds the table."""
    import os
    import subprocess
    import sys

    from probprune.pipeline import StopRequested, prune
    from tests.test_pipeline import settings

    model, out = tiny_model_dirs["llama"], tmp_path / "table"
    with pytest.raises(StopRequested):  # the first run killed after its 5th step
        prune(settings(model, calib_file, out / "sparsity-0.3-seed-0", seed=0, stop_after=5))
    flags = ["--steps", "8", "--k", "3", "--batch-size", "2", "--seqlen", "24", "--calib",
             calib_file, "--nsamples", "12", "--val-windows", "3", "--eval", calib_file,
             "--max-windows", "6", "--eval-every", "2", "--checkpoint-every", "2",
             "--compensate", "none", "--speed-tokens", "0"]  # those of settings()
    script = os.path.join(os.path.dirname(__file__), "..", "bench", "seed_runs.sh")
    env = {**os.environ, "SPARSITIES": "0.3", "SEEDS": "0 1",
           "PROBPRUNE_FAST": f"{sys.executable} -m probprune"}

    def start():
        done = subprocess.run(["bash", script, model, str(out), *flags], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done.stdout

    first = start()
    assert "sparsity-0.3-seed-0: resumed" in first and "sparsity-0.3-seed-1: started" in first
    assert "WARNING probprune.pipeline: resuming" in (out / "sparsity-0.3-seed-0.log").read_text()
    assert "mean +- sd of 2" in (out / "table.md").read_text()
    again = start()
    assert again.count("finished before, skipped") == 2
    assert again.splitlines()[2:] == first.splitlines()[2:]  # the same table

"""Mask-parallel search on gloo: 2 and 3 CPU processes give the one-process run's per-step losses,
probabilities and mask; runs resume under another world size; a dead rank stops the others."""
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
from safetensors.torch import load_file

from probprune.config import PruneConfig
from probprune.preflight import check
from probprune.checkpoint import load_checkpoint
from probprune.pipeline import CHECKPOINT, StopRequested, prune

STEPS = 6


def run_settings(model_dir, calib, out, **kw):
    base = dict(model=model_dir, sparsity=0.3, out=str(out), steps=STEPS, k=6, batch_size=2,
                seqlen=24, calib=calib, nsamples=12, val_windows=3, eval=calib,
                max_eval_windows=4, eval_every=2, checkpoint_every=1, progress=False, seed=5,
                compensate="none", lr=0.3, channel_block=5, antithetic=True, dist_timeout=60.0,
                speed_tokens=0)
    base.update(kw)
    return base


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, size, port, settings, result_path, die_at_step):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if die_at_step is not None:
        import probprune.search as search

        run_step = search.Search.run_step

        def dying(self):
            if self.step == die_at_step:
                os._exit(3)  # a crash: no exception, no goodbye to the other ranks
            return run_step(self)
        search.Search.run_step = dying
    outcome = {"rank": rank}
    try:
        report = prune(PruneConfig(**settings))
        outcome["report"] = report is not None
    except StopRequested:
        outcome["stopped"] = True
    except Exception as e:  # noqa: BLE001 - reported to the test, which asserts on it
        outcome["error"] = f"{type(e).__name__}: {e}"
        outcome["traceback"] = traceback.format_exc()
    with open(result_path, "w") as f:
        json.dump(outcome, f)


def run_ranks(size, settings, tmp_path, die=None, timeout=240):
    """``size`` ranks in spawned processes; ``die`` = (rank, step) crashes that rank there.
    Returns each rank's outcome and the seconds until every process ended."""
    ctx = mp.get_context("spawn")
    port, procs, paths = _free_port(), [], []
    for rank in range(size):
        paths.append(tmp_path / f"rank{rank}-{port}.json")
        die_at = die[1] if die is not None and die[0] == rank else None
        procs.append(ctx.Process(target=_rank_main,
                                 args=(rank, size, port, settings, str(paths[-1]), die_at)))
    t0 = time.monotonic()
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    elapsed = time.monotonic() - t0
    for p in procs:
        if p.is_alive():
            p.kill()
            raise AssertionError(f"a rank was still running after {timeout} s")
    return [json.load(open(p)) if p.exists() else None for p in paths], elapsed


def outputs(out):
    ckpt = load_checkpoint(os.path.join(out, CHECKPOINT))
    return (torch.tensor([h["losses"] for h in ckpt["history"]], dtype=torch.float64),
            load_file(os.path.join(out, "scores.safetensors"))["probs"],
            load_file(os.path.join(out, "masks.safetensors"))["mask"])


def assert_same_run(a, b):
    (la, pa, ma), (lb, pb, mb) = outputs(a), outputs(b)
    assert la.shape == (STEPS, 6)
    torch.testing.assert_close(lb, la, atol=1e-6, rtol=0)
    torch.testing.assert_close(pb, pa, atol=1e-6, rtol=0)
    assert torch.equal(ma, mb)


@pytest.fixture(scope="module")
def one_process(tiny_model_dirs, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    torch.set_num_threads(1)
    try:
        prune(PruneConfig(**run_settings(tiny_model_dirs["llama"], calib_file, out)))
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "0")) or os.cpu_count())
    return str(out)


def test_three_ranks_match_one_process(tiny_model_dirs, calib_file, tmp_path, one_process):
    out = tmp_path / "three"
    results, _ = run_ranks(3, run_settings(tiny_model_dirs["llama"], calib_file, out), tmp_path)
    assert [r.get("report") for r in results] == [True, False, False], results
    assert_same_run(one_process, str(out))
    # Rank 0 alone wrote the report.
    assert json.load(open(out / "report.json"))["settings"]["k"] == 6


def test_layers_over_two_devices_match_one_device(tiny_model_dirs, calib_file, tmp_path,
                                                  one_process):
    out = tmp_path / "split"
    prune(PruneConfig(**run_settings(tiny_model_dirs["llama"], calib_file, out,
                                     devices=["cpu", "cpu"])))
    assert_same_run(one_process, str(out))
    report = json.load(open(out / "report.json"))
    assert report["settings"]["devices"] == ["cpu", "cpu"]
    one = json.load(open(os.path.join(one_process, "report.json")))
    assert report["perplexity"]["pruned"]["nll"] == pytest.approx(
        one["perplexity"]["pruned"]["nll"], rel=1e-6)


def test_sharding_and_mask_parallel_combine(tiny_model_dirs, calib_file, tmp_path, one_process):
    """2 ranks, each spreading its layers over 2 of the 4 listed devices."""
    out = tmp_path / "both"
    results, _ = run_ranks(2, run_settings(tiny_model_dirs["llama"], calib_file, out,
                                           devices=["cpu"] * 4), tmp_path)
    assert [r.get("report") for r in results] == [True, False], results
    assert_same_run(one_process, str(out))
    assert json.load(open(out / "report.json"))["settings"]["devices"] == ["cpu", "cpu"]


def test_torchrun_launches_the_command_line(tiny_model_dirs, calib_file, tmp_path, one_process):
    out = tmp_path / "torchrun"
    s = run_settings(tiny_model_dirs["llama"], calib_file, out)
    cli = os.path.join(os.path.dirname(sys.executable), "probprune-fast")
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
            "2", cli, "prune", "--json", "--checkpoint-every", "1"]
    for key in ("model", "sparsity", "out", "steps", "k", "batch_size", "seqlen", "calib",
                "nsamples", "val_windows", "eval", "max_eval_windows", "eval_every", "seed",
                "compensate", "lr", "channel_block"):
        flag = {"max_eval_windows": "--max-windows"}.get(key, "--" + key.replace("_", "-"))
        args += [flag, str(s[key])]
    args.append("--antithetic")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1  # rank 0 prints, rank 1 does not
    assert_same_run(one_process, str(out))


@pytest.mark.parametrize("first,second", [(1, 2), (2, 1)])
def test_a_run_resumes_under_another_world_size(tiny_model_dirs, calib_file, tmp_path,
                                                one_process, first, second):
    out = tmp_path / "cut"
    model = tiny_model_dirs["llama"]

    def launch(size, **kw):
        s = run_settings(model, calib_file, out, **kw)
        if size == 1:
            torch.set_num_threads(1)
            try:
                prune(PruneConfig(**s))
            except StopRequested:
                pass
            return
        results, _ = run_ranks(size, s, tmp_path)
        assert all("error" not in r for r in results), results

    launch(first, stop_after=3)
    assert not (out / "report.json").exists()
    launch(second, resume=True)
    assert_same_run(one_process, str(out))


def test_a_dead_rank_stops_the_others_with_an_error(tiny_model_dirs, calib_file, tmp_path):
    s = run_settings(tiny_model_dirs["llama"], calib_file, tmp_path / "dead", dist_timeout=30.0)
    results, elapsed = run_ranks(2, s, tmp_path, die=(1, 2), timeout=120)
    assert results[1] is None  # it died without a word
    assert results[0] is not None and "error" in results[0], results
    assert results[0]["error"].startswith("PeerFailure: rank 0 of 2:"), results[0]
    assert "another rank has probably died" in results[0]["error"]
    assert elapsed < 90


def test_masks_must_share_evenly(tiny_model_dirs, calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = PruneConfig(**run_settings(tiny_model_dirs["llama"], calib_file, tmp_path, k=3,
                                     antithetic=False))
    with pytest.raises(ValueError, match=r"--k 3 masks cannot be shared evenly by the 2 "
                                         r"processes of this launch \(WORLD_SIZE\)"):
        check(cfg)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 12])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_each_row_is_scored_by_exactly_one_rank(n, size):
    from probprune.distributed import World

    parts = [list(range(n))[World(r, size).rows(n)] for r in range(size)]
    assert sum(parts, []) == list(range(n))  # in order, no row twice, none left out
    assert max(map(len, parts)) - min(map(len, parts)) <= 1

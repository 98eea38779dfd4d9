"""The checkpoint file: safetensors with JSON metadata, no pickle; what is written is read back
exactly, and what JSON cannot hold faithfully is refused when written, not mangled."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probprune.checkpoint import (CHECKPOINT, CheckpointError, RunCheckpoint, load_checkpoint,
                                  read_checkpoint, save_checkpoint)
from probprune.policy import PolicyState
from probprune.search import SearchState
from probprune.selection import Candidate
from tests.test_pipeline import same


def test_round_trip_of_a_search_state(tmp_path):
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(10, generator=g)
    ckpt = {"settings": {"k": 2, "lr": 0.01, "backend": None, "prune_layers": False},
            "policy": {"probs": probs, "step": 7, "adv_scale": float("nan"),
                       "control_variate": None},
            "history": [{"step": 1, "losses": [3.5, 3.25], "baseline": None}],
            "candidates": [{"step": 0, "mask": probs > 0.5, "val_loss": 3.1}],
            "data_rng": g.get_state(), "inf": float("inf"), "pair": (1, "a")}
    path = str(tmp_path / "c.safetensors")
    save_checkpoint(path, ckpt)
    back = load_checkpoint(path)
    assert torch.equal(back["policy"]["probs"], probs)
    assert back["candidates"][0]["mask"].dtype == torch.bool
    assert torch.equal(back["candidates"][0]["mask"], probs > 0.5)
    assert torch.equal(back["data_rng"], g.get_state())  # an RNG state restores the stream
    g2 = torch.Generator()
    g2.set_state(back["data_rng"])
    assert torch.equal(torch.rand(3, generator=g2), torch.rand(3, generator=g))
    assert math.isnan(back["policy"]["adv_scale"]) and back["inf"] == float("inf")
    assert back["settings"] == ckpt["settings"] and back["history"] == ckpt["history"]
    assert back["policy"]["step"] == 7 and isinstance(back["policy"]["step"], int)
    assert back["pair"] == [1, "a"]
    with safe_open(path, framework="pt") as f:  # any safetensors reader sees what it holds
        tree = json.loads(f.metadata()["tree"])
    assert tree["policy"]["probs"] == {"__tensor__": "t0"}


def test_what_json_cannot_hold_is_refused(tmp_path):
    with pytest.raises(TypeError, match="keys must be strings"):
        save_checkpoint(str(tmp_path / "a"), {"layers": {0: 1}})
    with pytest.raises(TypeError, match=r"/x is a set"):
        save_checkpoint(str(tmp_path / "b"), {"x": {1, 2}})


def test_other_files_are_named_not_loaded(tmp_path):
    other = str(tmp_path / "weights.safetensors")
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(CheckpointError, match="not a probprune checkpoint"):
        load_checkpoint(other)
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 16)
    with pytest.raises(CheckpointError, match="cannot read the checkpoint"):
        load_checkpoint(str(broken))


def test_a_pickled_checkpoint_of_an_older_version_is_named_not_unpickled(tmp_path):
    import types

    (tmp_path / "checkpoint.pt").write_bytes(b"not read")
    with pytest.raises(ValueError, match="checkpoint.pt of an older probprune"):
        read_checkpoint(types.SimpleNamespace(out=str(tmp_path), resume=True))


def _run_checkpoint(rng: bool) -> RunCheckpoint:
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(6, generator=g)
    state = SearchState.start(probs, probs > 0.5, 3.0)
    state.offer(2, 2.5, probs > 0.3, keep=3)
    state.history.append({"step": 1, "losses": [3.5, 3.25], "baseline": None, "val_loss": 2.5})
    state.step_times.append(0.25)
    streams = {"data_rng": g.get_state(), "mask_rng": torch.Generator().manual_seed(3).get_state()}
    return RunCheckpoint({"k": 2, "backend": None}, {"ppl": 10.5}, {"ppl": 20.25},
                         torch.arange(6).view(2, 3), PolicyState(probs).state_dict(), state,
                         streams if rng else None)


@pytest.mark.parametrize("rng", [True, False])
def test_a_run_checkpoint_reads_back_as_written(tmp_path, rng):
    ckpt = _run_checkpoint(rng)
    path = str(tmp_path / CHECKPOINT)
    ckpt.save(path)
    back = RunCheckpoint.load(path)
    same(back.to_tree(), ckpt.to_tree())
    assert (back.rng is None) == (not rng)
    assert all(isinstance(c, Candidate) for c in back.search.candidates)
    assert [(c.step, c.val_loss) for c in back.search.candidates] == [(2, 2.5), (0, 3.0)]
    # the file's entries are those of the format resume has always read
    assert list(load_checkpoint(path)) == [
        "settings", "dense", "init", "channel_order", "init_probs", "init_mask", "init_val_loss",
        "best", "history", "step_times", "candidates", "policy"] + (
        ["data_rng", "mask_rng"] if rng else [])
    assert set(load_checkpoint(path)["candidates"][0]) == {"step", "val_loss", "mask"}


def test_resume_reads_the_run_directory_checkpoint_and_checks_its_settings(tmp_path):
    import types

    _run_checkpoint(True).save(str(tmp_path / CHECKPOINT))

    def cfg(resume, mismatch=()):
        return types.SimpleNamespace(out=str(tmp_path), resume=resume,
                                     resume_mismatch=lambda settings: list(mismatch))
    assert read_checkpoint(cfg(False)) is None  # starting over: the checkpoint is not read
    assert read_checkpoint(cfg(True)).settings == {"k": 2, "backend": None}
    with pytest.raises(ValueError, match="settings differ from the checkpoint's in k"):
        read_checkpoint(cfg(True, ["k (2 there, 3 now)"]))

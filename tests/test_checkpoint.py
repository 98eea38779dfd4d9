"""The checkpoint file: safetensors with JSON metadata, no pickle; what is written is read back
exactly, and what JSON cannot hold faithfully is refused when written, not mangled."""
import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from probprune.checkpoint import CheckpointError, load_checkpoint, save_checkpoint


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

    from probprune.pipeline import read_checkpoint

    (tmp_path / "checkpoint.pt").write_bytes(b"not read")
    with pytest.raises(ValueError, match="checkpoint.pt of an older probprune"):
        read_checkpoint(types.SimpleNamespace(out=str(tmp_path), resume=True))

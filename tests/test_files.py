"""Atomic writes: an interrupted write leaves the previous file whole and no temporary behind."""
import os

import pytest

from probprune.files import atomic_write, atomic_write_text


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "report.json")
    atomic_write_text(path, "old")

    def half_then_crash(tmp):
        with open(tmp, "w") as f:
            f.write("ne")
        raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_crash)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["report.json"]
    atomic_write_text(path, "new")
    assert open(path).read() == "new" and os.listdir(tmp_path) == ["report.json"]


def test_a_directory_is_written_whole_or_not_at_all(tmp_path):
    target = str(tmp_path / "model")

    def crash(tmp):
        os.makedirs(tmp)
        open(os.path.join(tmp, "config.json"), "w").close()
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crash)
    assert os.listdir(tmp_path) == []
    atomic_write(target, lambda tmp: os.makedirs(os.path.join(tmp, "sub")))
    assert os.listdir(target) == ["sub"]

"""Preflight once: the checks that read files and ask the machine run once per run, whether the
command line starts it (it checks, then hands the checked config to the pipeline) or Python does
(the pipeline checks); a config changed after its check is checked again."""
import dataclasses

import pytest

import probprune
import probprune.pipeline
import probprune.preflight
from probprune.cli import main
from probprune.config import ConfigError, PruneConfig
from probprune.preflight import check


class Stop(ValueError):
    """Raised where the run would first read the model: the checks are behind it."""


@pytest.fixture()
def checks(monkeypatch):
    """The list of the checks run (one entry per full check), the run stopped before loading."""
    runs, check = [], probprune.preflight._check

    def counted(config, skip):
        runs.append(type(config).__name__)
        check(config, skip)

    def stop(name):
        raise Stop("stop before loading")

    monkeypatch.setattr(probprune.preflight, "_check", counted)
    monkeypatch.setattr(probprune.pipeline, "resolve_model_path", stop)
    return runs


def test_the_command_line_checks_once(tiny_model_dirs, calib_file, tmp_path, checks, capsys):
    argv = ["prune", "--model", tiny_model_dirs["llama"], "--sparsity", "0.3", "--out",
            str(tmp_path / "run"), "--calib", calib_file, "--eval", calib_file, "--device", "cpu"]
    assert main(argv) == 2
    assert "stop before loading" in capsys.readouterr().err
    assert checks == ["PruneConfig"]


def test_the_python_api_checks_once(tiny_model_dirs, calib_file, checks):
    with pytest.raises(Stop):
        probprune.prune(tiny_model_dirs["llama"], sparsity=0.3, calib=calib_file,
                        eval=calib_file, device="cpu")
    assert checks == ["PruneConfig"]


def test_a_changed_config_is_checked_again(tiny_model_dirs, calib_file, tmp_path, checks):
    cfg = PruneConfig(model=tiny_model_dirs["llama"], sparsity=0.3, out=str(tmp_path / "run"),
                      calib=calib_file, eval=calib_file, device="cpu")
    check(cfg)
    check(cfg)
    assert len(checks) == 1
    check(dataclasses.replace(cfg, steps=3))
    cfg.lr = -1.0
    with pytest.raises(ConfigError, match="--lr must be > 0"):
        check(cfg)
    assert len(checks) == 3

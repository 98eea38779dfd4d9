"""``--config FILE``: every flag from a YAML or JSON file, flags on the line over it, and a run's
recorded settings (report.json) re-run it."""
import json

import pytest
from safetensors.torch import load_file

from probprune.cli import build_parser, file_settings, main
from probprune.config import ConfigError, PruneConfig
from probprune.flags import from_args, read_config_file

TINY = {"sparsity": 0.3, "steps": 4, "k": 2, "batch-size": 2, "seqlen": 24, "nsamples": 12,
        "val-windows": 3, "select-windows": 3, "max-windows": 4, "compensate-windows": 6,
        "speed-tokens": 0, "seed": 5}


def _parse(argv):
    return from_args(PruneConfig, build_parser(file_settings(argv)).parse_args(argv))


def test_yaml_keys_are_flags_and_the_line_overrides_them(tmp_path, tiny_model_dirs, calib_file):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {tiny_model_dirs['llama']}\nout: {tmp_path / 'o'}\n"
                    f"sparsity: 0.4\nbatch-size: 3\n--lr: 0.05\nprotect_layers: [0, 2]\n"
                    f"compensate: none\nprogress: true\n")
    cfg = _parse(["prune", "--config", str(path)])
    assert (cfg.sparsity, cfg.batch_size, cfg.lr, cfg.protect_layers) == (0.4, 3, 0.05, [0, 2])
    assert cfg.compensate == "none" and cfg.k == PruneConfig.__dataclass_fields__["k"].default
    cfg = _parse(["prune", "--config", str(path), "--batch-size", "5", "--protect-layers", "1"])
    assert cfg.batch_size == 5 and cfg.protect_layers == [1]  # the line's list, not appended
    assert cfg.sparsity == 0.4


def test_a_runs_report_reruns_it(tmp_path, tiny_model_dirs, calib_file):
    first = tmp_path / "first"
    argv = ["prune", "--model", tiny_model_dirs["llama"], "--calib", calib_file, "--eval",
            calib_file, "--out", str(first), "--json"]
    argv += [a for k, v in TINY.items() for a in (f"--{k}", str(v))]
    assert main(argv) == 0
    again = tmp_path / "again"
    assert main(["prune", "--config", str(first / "report.json"), "--out", str(again),
                 "--json"]) == 0
    a, b = (json.load(open(d / "report.json"))["settings"] for d in (first, again))
    assert {k: v for k, v in a.items() if k != "out"} == {k: v for k, v in b.items() if k != "out"}
    assert (load_file(str(first / "masks.safetensors"))["mask"]
            == load_file(str(again / "masks.safetensors"))["mask"]).all()


def test_unknown_keys_and_bad_files_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sparsity": 0.3, "batchsize": 4}))
    with pytest.raises(ConfigError, match="does not take: batchsize"):
        read_config_file(str(bad), PruneConfig)
    broken = tmp_path / "broken.yaml"
    broken.write_text("steps: [1, 2\n")
    assert main(["prune", "--config", str(broken)]) == 2
    assert "is not valid JSON / YAML" in capsys.readouterr().err
    assert main(["prune", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "cannot read" in capsys.readouterr().err

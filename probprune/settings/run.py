"""Where the run goes and how it executes: its directory, devices, dtype, kernels, seed,
resume."""
from typing import List, Optional

from .base import Settings, at_least, name_list, rule, setting, stage


def default_device() -> str:
    import torch  # asked only when a config is made, so that the settings load without torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@stage("system")
class RunSettings(Settings):
    out: str = setting(help="run directory: checkpoint, pruned model, report")
    device: str = setting(
        factory=default_device, help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)",
        cli_default=None, from_cli=lambda v: v or default_device())
    devices: List[str] = setting(
        [], parse=name_list,
        help="several devices, comma-separated (cuda:0,cuda:1): contiguous decoder layers on "
             "each, balanced by parameters, for a model larger than one device; under torchrun "
             "the list is split evenly among the ranks. Takes the place of --device")
    dtype: str = setting("auto", choices=("auto", "float32", "float16", "bfloat16"),
                         help="weights and activations dtype; auto: float32 on the CPU, on a GPU "
                              "the checkpoint's float16/bfloat16, else bfloat16",
                         resume=True)
    backend: Optional[str] = setting(
        None, choices=("reference", "triton", "cuda"),
        help="kernel backend (default: $PROBPRUNE_BACKEND, else the best available)")
    seed: int = setting(0, help="seed of the calibration windows, batches and sampled masks",
                        check=rule(lambda v: 0 <= v < 2**63, "must lie in [0, 2**63)"),
                        resume=True)
    dist_timeout: float = setting(
        1800.0, check=rule(lambda v: v > 0, "must be > 0"),
        help="seconds a rank of a torchrun launch waits for the others before it stops with an "
             "error (rank 0 runs the init and the export alone)")
    dry_run: bool = setting(False, help="print the memory plan of the run and stop before "
                                        "loading any weight (the model's config.json is "
                                        "enough; the device need not be on this machine)")
    resume: bool = setting(False, help="continue the checkpoint in --out")
    progress: bool = setting(True, cli=False, help="show progress bars")
    stop_after: Optional[int] = setting(None, cli=False, check=at_least(1),
                                        help="end the process after this step (tests of resume)")

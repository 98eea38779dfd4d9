"""What is pruned, and the calibration text it learns from."""
from .base import Settings, at_least, setting, stage


@stage("model and data")
class DataSettings(Settings):
    model: str = setting(
        help="Hugging Face directory or hub name, a probprune pruned directory, or the embedded "
             "'smollm2-135m'; with --dry-run a directory holding only config.json will do",
        resume=True)
    seqlen: int = setting(128, help="window length in tokens", check=at_least(2), resume=True)
    calib: str = setting(
        "wiki-summaries", help="calibration text: wiki-summaries, wikitext2, c4, or a local "
                               ".txt/.jsonl/.json file or folder", resume=True)
    nsamples: int = setting(512, help="calibration windows the steps draw their batches from",
                            check=at_least(1), resume=True)
    val_windows: int = setting(64, help="held-out calibration windows that choose the best hard "
                                        "mask", check=at_least(1), resume=True)
    select_windows: int = setting(
        256, check=at_least(1),
        help="held-out calibration windows, apart from --val-windows, on which the compensated "
             "search mask and the compensated init mask compete for the export")

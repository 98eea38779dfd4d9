"""The least-squares refit of the kept weights before export."""
from typing import Optional

from .base import Settings, at_least, rule, setting, stage


@stage("compensation")
class CompensationSettings(Settings):
    compensate: str = setting(
        "sequential", choices=("none", "parallel", "sequential"),
        help="refit o_proj and down_proj on the kept heads and channels before export, by least "
             "squares on calibration activations: sequential takes each layer's inputs from the "
             "already pruned and refit layers before it, parallel from the dense model")
    compensate_select: str = setting(
        "obs", choices=("mask", "obs"),
        help="which MLP channels the compensated export keeps: the mask's, or as many per layer "
             "chosen by greedy structured OBS on that layer's down_proj input statistics")
    compensate_target: str = setting(
        "local", choices=("local", "dense"),
        help="what the sequential refit matches: local, the dense sublayer's output on the "
             "pruned model's own inputs; dense, the dense model's residual stream, so each "
             "refit also corrects the drift the earlier layers left (one more copy of the "
             "calibration hidden states)")
    compensate_inputs: bool = setting(
        False, help="with --compensate sequential: also refit each kept layer's q/k/v and "
                    "gate/up projections so that they read, from the pruned model's normed "
                    "inputs, what the dense model's would have been (one least-squares d x d map "
                    "per sublayer; carries the dense model's calibration stream)")
    compensate_bias: Optional[bool] = setting(
        None, help="also fit a bias of o_proj and down_proj (the mean shift of the pruned "
                   "inputs; OBS then selects on the inputs' covariance); the export's config "
                   "records it and its modeling file adds it; --no-compensate-bias refits the "
                   "weights only (default: on, except with --shape uniform, whose plain "
                   "architecture has no place for the bias)")
    compensate_damping: float = setting(
        0.01, help="ridge damping of the refit, as a fraction of the mean diagonal of the kept "
                   "inputs' Gram matrix", check=rule(lambda v: v >= 0, "must be >= 0"))
    compensate_windows: int = setting(
        512, help="calibration windows the refit's statistics are taken on (the first of the "
                  "--nsamples pool; at most that many)",
        check=at_least(1))

    @property
    def fits_bias(self) -> bool:
        """Whether the refit fits a bias: ``compensate_bias``, or where it is unset, yes unless
        the run's layers are uniform (a run's config is a ``CompensationSettings`` too, with its
        budget's ``shape``)."""
        if self.compensate_bias is not None:
            return self.compensate_bias
        return getattr(self, "shape", "free") != "uniform"

"""The policy-gradient search: where it starts (the init) and how it steps."""
from .base import POSITIVE, Settings, at_least, rule, setting, stage

INIT_METHODS = ("wanda-sp", "magnitude", "constant")
BASELINES = ("leave-one-out", "moving-average")
OPTIMIZERS = ("sgd", "adam")


@stage("search")
class SearchSettings(Settings):
    steps: int = setting(400, help="policy-gradient steps", check=at_least(1), resume=True)
    k: int = setting(2, help="masks sampled per step (one batched forward)", check=at_least(1),
                     resume=True)
    batch_size: int = setting(4, help="calibration windows per step", check=at_least(1),
                              resume=True)
    lr: float = setting(0.01, help="peak learning rate (cosine schedule); advantages are in "
                                   "units of their running RMS", check=POSITIVE, resume=True)
    min_lr_ratio: float = setting(0.0, help="final learning rate as a fraction of --lr",
                                  check=rule(lambda v: 0 <= v <= 1, "must lie in [0, 1]"))
    init: str = setting(
        "wanda-sp", help=f"{', '.join(INIT_METHODS)}, or the scores file of an earlier run "
                         f"(scores.safetensors)", resume=True)
    init_temperature: float = setting(
        0.1, help="temperature of the sigmoid that maps the init metric (z-scores inside each "
                  "layer) to probabilities: lower keeps the sampled masks closer to the init's "
                  "hard mask", check=POSITIVE, resume=True)
    init_attn_sparsity: float = setting(
        0.0, help="fraction of attention the init removes under a global budget (the MLP takes "
                  "the rest; the search then moves budget between them)",
        check=rule(lambda v: 0 <= v < 1, "must lie in [0, 1)"), resume=True)
    init_windows: int = setting(64, help="calibration windows of the init's activation "
                                         "statistics", check=at_least(1), resume=True)
    channel_block: int = setting(
        64, help="MLP channels per search unit: each layer's channels are ranked by the init "
                 "metric and cut into blocks of this size, so the search learns how many "
                 "channels each layer keeps, with far less noise per unit; 1 searches every "
                 "channel on its own", check=at_least(1), resume=True)
    select_candidates: int = setting(
        1, check=at_least(1), resume=True,
        help="compensate the N hard masks with the lowest held-out losses seen (bare slices) and "
             "export the one whose compensated held-out loss is lowest; 1: the best bare mask. "
             "With compensation on, the init mask always competes too")
    search_loss: str = setting(
        "bare", choices=("bare", "refit"), resume=True,
        help="what scores each sampled mask: bare, the loss of its slice; refit, its loss after "
             "a least-squares refit of o_proj and down_proj to its own kept heads and channels "
             "(the dense model's input statistics on --search-refit-windows windows, with "
             "--compensate-damping), so the search ranks masks as compensation will leave them; "
             "costs one Cholesky solve per layer and mask in every step and all layers' input "
             "second moments in memory")
    search_refit_windows: int = setting(
        128, check=at_least(1), resume=True,
        help="with --search-loss refit: calibration windows of the input statistics (the first "
             "of the --nsamples pool)")
    optimizer: str = setting(
        "sgd", choices=OPTIMIZERS, resume=True,
        help="update of the keep-probabilities: sgd (the preconditioned REINFORCE step) or adam "
             "on that step (betas 0.5, 0.999, as the paper's code)")
    antithetic: bool = setting(
        False, resume=True,
        help="sample the K masks as K/2 antithetic pairs (u and 1 - u) and use the DisARM "
             "estimator, whose pairs are their own baseline (needs an even --k)")
    control_variate: bool = setting(
        False, resume=True,
        help="subtract a linear model of the loss in the mask (a ridge fit on the last "
             "--cv-history samples) and add its exact gradient: unbiased, lower variance")
    cv_history: int = setting(256, help="samples the control variate is fitted on",
                              check=at_least(2), resume=True)
    cv_ridge: float = setting(
        1.0, help="ridge of the control variate's fit, in units of the mean squared mask "
                  "deviation", check=rule(lambda v: v > 0, "must be > 0"), resume=True)
    baseline: str = setting("leave-one-out", choices=BASELINES, help="REINFORCE baseline",
                            resume=True)
    ma_window: int = setting(5, help="past steps the moving-average baseline averages",
                             check=at_least(1))
    eval_every: int = setting(25, help="steps between held-out evaluations of the hard mask",
                              check=at_least(1))
    checkpoint_every: int = setting(25, help="steps between checkpoints", check=at_least(1))

"""The REINFORCE estimator, its baselines and the schedule, on objectives with known gradients."""
import math

import pytest
import torch

from probprune.policy import (Policy, PolicyConfig, PolicyState, advantages, cosine_lr,
                              score_gradient)

A = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=torch.float64)
PAIR = 4.0


def toy_loss(m):
    """L(m) = a.m + 4 m0 m1: E[L] = a.s + 4 s0 s1, so dE/ds = a + 4 (s1, s0, 0, 0, 0)."""
    m = m.double()
    return m @ A + PAIR * m[:, 0] * m[:, 1]


def toy_gradient(s):
    g = A.clone()
    g[0] += PAIR * s[1]
    g[1] += PAIR * s[0]
    return g


@pytest.mark.parametrize("baseline", ["leave-one-out", "moving-average"])
def test_estimator_is_unbiased(baseline):
    torch.manual_seed(0)
    s = torch.tensor([0.3, 0.6, 0.5, 0.9, 0.2], dtype=torch.float64)
    K, trials = 4, 40000
    m = torch.rand(trials, K, 5, dtype=torch.float64) < s
    L = toy_loss(m.view(-1, 5)).view(trials, K)
    # A past moving average is a constant w.r.t. this step's samples: any value keeps it unbiased.
    past = torch.tensor(2.5 if baseline == "moving-average" else float("nan"), dtype=torch.float64)
    finite = torch.ones(K, dtype=torch.bool)
    grads = torch.stack([score_gradient(advantages(L[t], finite, baseline, past), m[t], s)
                         for t in range(trials)])
    mean, sem = grads.mean(0), grads.std(0) / math.sqrt(trials)
    assert torch.all((mean - toy_gradient(s)).abs() < 5 * sem + 1e-3), (mean, toy_gradient(s), sem)


def test_preconditioned_step_is_the_gradient_times_sqrt_variance():
    s = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64)
    m = torch.tensor([[1, 0, 1], [0, 0, 1], [1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([0.5, -1.0, 0.25], dtype=torch.float64)
    unbiased = score_gradient(adv, m, s)
    step = score_gradient(adv, m, s, eps=0.0)
    torch.testing.assert_close(step, unbiased * torch.sqrt(s * (1 - s)))


def test_gradient_is_zero_at_the_bounds():
    s = torch.tensor([0.0, 1.0], dtype=torch.float64)
    m = torch.tensor([[False, True], [False, True]])
    assert torch.equal(score_gradient(torch.tensor([1.0, -1.0]), m, s), torch.zeros(2, dtype=torch.float64))


NO_PAST = torch.tensor(float("nan"), dtype=torch.float64)


def test_leave_one_out_baseline():
    L = torch.tensor([1.0, 2.0, 6.0])
    every = torch.ones(3, dtype=torch.bool)
    torch.testing.assert_close(advantages(L, every, "leave-one-out", NO_PAST),
                               torch.tensor([-3.0, -1.5, 4.5], dtype=torch.float64))
    # A non-finite sample is left out of the others' baselines and gets no advantage.
    L = torch.tensor([1.0, float("nan"), 2.0, 6.0])
    torch.testing.assert_close(advantages(L, torch.isfinite(L), "leave-one-out", NO_PAST),
                               torch.tensor([-3.0, 0.0, -1.5, 4.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="at least 2 samples"):
        advantages(L[:1], every[:1], "leave-one-out", NO_PAST)


def test_moving_average_baseline():
    L = torch.tensor([1.0, 3.0])
    every = torch.ones(2, dtype=torch.bool)
    # No past yet: this step's mean; else the past mean.
    torch.testing.assert_close(advantages(L, every, "moving-average", NO_PAST),
                               torch.tensor([-1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(advantages(L, every, "moving-average",
                                          torch.tensor(0.5, dtype=torch.float64)),
                               torch.tensor([0.5, 2.5], dtype=torch.float64))
    pol = Policy(PolicyConfig(lr=0.1, steps=10, baseline="moving-average", ma_window=2),
                 PolicyState(torch.full((2,), 0.5)))
    masks = torch.tensor([[True, False], [False, True]])
    for losses in ([1.0, 3.0], [5.0, 7.0], [9.0, 9.0]):
        stats = pol.update(torch.tensor(losses), masks, lambda p: p)
    # The baseline of the last step is the mean of the two step means before it: (2 + 6) / 2.
    assert float(stats["baseline"]) == 4.0 and float(pol.baseline_value()) == (6.0 + 9.0) / 2


def test_cosine_schedule():
    assert cosine_lr(0, 100, 0.1) == pytest.approx(0.1)
    assert cosine_lr(50, 100, 0.1) == pytest.approx(0.05)
    assert cosine_lr(100, 100, 0.1, min_ratio=0.1) == pytest.approx(0.01)


def test_nan_losses_are_skipped_and_counted():
    probs = torch.full((4,), 0.5)
    pol = Policy(PolicyConfig(lr=0.1, steps=10), PolicyState(probs))
    masks = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    stats = pol.update(torch.tensor([1.0, float("nan"), 3.0]), masks, lambda p: p)
    assert stats["valid"] == 2 and pol.state.nan_samples == 1 and pol.state.step == 1
    assert float(stats["mean_loss"]) == 2.0
    # The step equals the one taken on the two finite samples alone.
    alone = Policy(PolicyConfig(lr=0.1, steps=10), PolicyState(torch.full((4,), 0.5)))
    alone.update(torch.tensor([1.0, 3.0]), masks[[0, 2]], lambda p: p)
    torch.testing.assert_close(pol.probs, alone.probs)
    assert torch.isfinite(pol.probs).all() and not torch.equal(pol.probs, probs)
    before = pol.probs.clone()
    stats = pol.update(torch.tensor([float("nan"), float("inf"), 1.0]), masks, lambda p: p)
    assert pol.state.skipped_steps == 1 and pol.state.nan_samples == 3
    assert torch.equal(pol.probs, before) and torch.isnan(stats["mean_loss"])


def test_state_round_trips_through_a_checkpoint():
    pol = Policy(PolicyConfig(lr=0.1, steps=10, baseline="moving-average"),
                 PolicyState(torch.full((3,), 0.5)))
    masks = torch.tensor([[True, False, True], [False, True, True]])
    pol.update(torch.tensor([1.0, float("nan")]), masks, lambda p: p)
    again = Policy(pol.config, PolicyState.from_state_dict(pol.state.state_dict(), "cpu"))
    for p in (pol, again):
        p.update(torch.tensor([2.0, 4.0]), masks, lambda p: p)
    torch.testing.assert_close(again.probs, pol.probs)
    assert int(again.state.nan_samples) == 1 and again.state.step == 2


def test_descends_the_toy_objective():
    torch.manual_seed(0)
    probs = torch.full((5,), 0.5, dtype=torch.float64)
    pol = Policy(PolicyConfig(lr=0.05, steps=300, baseline="leave-one-out"), PolicyState(probs))
    for _ in range(300):
        m = torch.rand(4, 5, dtype=torch.float64) < pol.probs
        pol.update(toy_loss(m), m, lambda p: p.clamp(0, 1))
    # Minimiser of a.s + 4 s0 s1 on the box: s = (0, 1, 0, 0, any).
    assert pol.probs[1] > 0.9 and pol.probs[0] < 0.1 and pol.probs[2] < 0.1 and pol.probs[3] < 0.1


def test_adam_step_is_torch_adam_on_the_step_direction():
    torch.manual_seed(1)
    probs = torch.full((5,), 0.5, dtype=torch.float64)
    cfg = PolicyConfig(lr=0.01, steps=20, optimizer="adam")
    pol = Policy(cfg, PolicyState(probs.clone()))
    param = torch.nn.Parameter(probs.clone())
    opt = torch.optim.Adam([param], lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps)
    plain = Policy(PolicyConfig(lr=0.01, steps=20), PolicyState(probs.clone()))
    for step in range(5):
        m = torch.rand(3, 5, dtype=torch.float64) < pol.probs
        losses = toy_loss(m)
        # the SGD policy at the same state gives the step direction (its lr-scaled move)
        plain.state.probs = pol.probs.clone()
        plain.state.adv_scale = pol.state.adv_scale.clone()
        plain.state.step = pol.state.step
        before = plain.probs.clone()
        plain.update(losses, m, lambda p: p)
        direction = (before - plain.probs) / cosine_lr(step, 20, 0.01)
        pol.update(losses, m, lambda p: p)
        param.grad = direction.clone()
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, 20, 0.01)
        opt.step()
        torch.testing.assert_close(pol.probs, param.detach())


def test_adam_state_round_trips_and_descends():
    torch.manual_seed(0)
    pol = Policy(PolicyConfig(lr=0.05, steps=300, optimizer="adam"),
                 PolicyState(torch.full((5,), 0.5, dtype=torch.float64)))
    for i in range(300):
        m = torch.rand(4, 5, dtype=torch.float64) < pol.probs
        pol.update(toy_loss(m), m, lambda p: p.clamp(0, 1))
        if i == 150:
            pol = Policy(pol.config, PolicyState.from_state_dict(pol.state.state_dict(), "cpu"))
    assert int(pol.state.adam_steps) == 300
    assert pol.probs[1] > 0.9 and pol.probs[0] < 0.1 and pol.probs[2] < 0.1
    with pytest.raises(ValueError, match="unknown optimizer"):
        Policy(PolicyConfig(optimizer="rmsprop"), PolicyState(torch.full((2,), 0.5)))

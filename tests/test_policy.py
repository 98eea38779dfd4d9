"""The REINFORCE estimator, its baselines and the schedule, on objectives with known gradients."""
import math

import pytest
import torch

from probprune.policy import (Policy, PolicyConfig, PolicyState, advantages, antithetic_gradient,
                              cosine_lr,
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


# -- variance reducers ---------------------------------------------------------------------------

S_TOY = torch.tensor([0.3, 0.6, 0.5, 0.9, 0.2], dtype=torch.float64)
EPS = PolicyConfig().eps


def _mean_step_direction(config, make_state, sample, trials):
    """Monte Carlo mean and standard error of one update's direction, (s - s') / lr, each trial
    from a fresh copy of the same state (lr small enough that nothing is clamped)."""
    dirs = []
    for _ in range(trials):
        pol = Policy(config, make_state())
        m = sample()
        before = pol.probs.clone()
        pol.update(toy_loss(m), m, lambda p: p)
        dirs.append((before - pol.probs) / config.lr)
    d = torch.stack(dirs)
    return d.mean(0), d.std(0) / math.sqrt(trials)


def _antithetic(k):
    u = torch.rand(k // 2, 5, dtype=torch.float64)
    return torch.cat([u, 1 - u]) < S_TOY


def test_antithetic_gradient_is_unbiased():
    torch.manual_seed(0)
    trials, K = 40000, 4
    u = torch.rand(trials, K // 2, 5, dtype=torch.float64)
    m = torch.cat([u, 1 - u], 1) < S_TOY
    L = toy_loss(m.view(-1, 5)).view(trials, K)
    finite = torch.ones(K, dtype=torch.bool)
    grads = torch.stack([antithetic_gradient(L[t], m[t], S_TOY, finite) for t in range(trials)])
    mean, sem = grads.mean(0), grads.std(0) / math.sqrt(trials)
    assert torch.all((mean - toy_gradient(S_TOY)).abs() < 5 * sem + 1e-3), (mean, sem)


def test_antithetic_pair_by_hand():
    # One unit at s = 0.3: the pair disagrees, L = 2 with the unit kept and 0.5 without:
    # 1/2 (2 - 0.5) (1 - 0) max(0.3, 0.7) / (0.3 * 0.7).
    s = torch.tensor([0.3], dtype=torch.float64)
    g = antithetic_gradient(torch.tensor([2.0, 0.5]), torch.tensor([[True], [False]]), s,
                            torch.ones(2, dtype=torch.bool))
    torch.testing.assert_close(g, torch.tensor([0.5 * 1.5 * 0.7 / 0.21], dtype=torch.float64))
    # Pairs are (k, k + K/2). One that agrees carries no signal; one with a NaN is left out.
    same = antithetic_gradient(torch.tensor([2.0, float("nan"), 0.5, 9.0]),
                               torch.tensor([[True], [True], [True], [False]]), s,
                               torch.tensor([True, False, True, True]))
    assert torch.equal(same, torch.zeros(1, dtype=torch.float64))


def test_antithetic_policy_step_is_unbiased():
    torch.manual_seed(1)
    cfg = PolicyConfig(lr=1e-4, steps=10, normalize=False, antithetic=True)
    mean, sem = _mean_step_direction(cfg, lambda: PolicyState(S_TOY.clone()),
                                     lambda: _antithetic(2), 30000)
    var = S_TOY * (1 - S_TOY)
    want = toy_gradient(S_TOY) * var / torch.sqrt(var + EPS)
    assert torch.all((mean - want).abs() < 5 * sem + 1e-3), (mean, want, sem)


def _fitted_cv_state(n_rows=64, seed=3):
    """A control variate's buffer filled from toy losses of random masks, as the policy fills it."""
    from probprune.control_variate import LinearControlVariate
    g = torch.Generator().manual_seed(seed)
    cv = LinearControlVariate(5, n_rows, 1e-6, "cpu")
    for _ in range(n_rows // 4):
        m = torch.rand(4, 5, generator=g, dtype=torch.float64) < S_TOY
        cv.add(toy_loss(m), m, torch.ones(4, dtype=torch.bool), torch.tensor(True))
    return cv


def test_control_variate_recovers_a_linear_loss():
    from probprune.control_variate import LinearControlVariate
    g = torch.Generator().manual_seed(0)
    cv = LinearControlVariate(5, 40, 1e-8, "cpu")
    for step in range(10):
        m = torch.rand(4, 5, generator=g, dtype=torch.float64) < S_TOY
        # a per-step offset (the batch's difficulty) must not matter: the fit is within a step
        cv.add(m.double() @ A + 10.0 * step, m, torch.ones(4, dtype=torch.bool), torch.tensor(True))
    w = cv.weights()
    torch.testing.assert_close(w, A, atol=1e-5, rtol=0)
    m = torch.rand(4, 5, generator=g, dtype=torch.float64) < S_TOY
    explained = cv.explained(w, m.double() @ A - 3.0, m, torch.ones(4, dtype=torch.bool))
    assert abs(float(explained) - 1) < 1e-6
    # A skipped step writes nothing; a non-finite loss writes a zero row.
    before = {k: v.clone() for k, v in cv.state.items()}
    cv.add(torch.ones(4), m, torch.ones(4, dtype=torch.bool), torch.tensor(False))
    assert all(torch.equal(before[k], cv.state[k]) for k in before)


def test_control_variate_step_is_unbiased_and_removes_the_linear_part():
    torch.manual_seed(2)
    fitted = _fitted_cv_state().state
    cfg = PolicyConfig(lr=1e-4, steps=10, normalize=False, control_variate=True, cv_history=64)
    var = S_TOY * (1 - S_TOY)
    want = toy_gradient(S_TOY) * var / torch.sqrt(var + EPS)
    make = lambda: PolicyState(S_TOY.clone(), control_variate=dict(fitted))  # noqa: E731
    sample = lambda: torch.rand(4, 5, dtype=torch.float64) < S_TOY  # noqa: E731
    mean, sem = _mean_step_direction(cfg, make, sample, 20000)
    assert torch.all((mean - want).abs() < 5 * sem + 1e-3), (mean, want, sem)
    # The linear part of the toy loss is predicted, so the estimate's spread is smaller than
    # plain REINFORCE's with the same samples.
    torch.manual_seed(2)
    plain_mean, plain_sem = _mean_step_direction(
        PolicyConfig(lr=1e-4, steps=10, normalize=False), lambda: PolicyState(S_TOY.clone()),
        sample, 20000)
    assert float(sem.pow(2).sum()) < 0.5 * float(plain_sem.pow(2).sum())


def test_control_variate_state_round_trips_through_a_checkpoint():
    torch.manual_seed(4)
    cfg = PolicyConfig(lr=0.05, steps=20, control_variate=True, cv_history=8, antithetic=True)
    pol = Policy(cfg, PolicyState(S_TOY.clone()))
    for _ in range(3):
        m = _antithetic(4)
        pol.update(toy_loss(m), m, lambda p: p.clamp(0, 1))
    again = Policy(cfg, PolicyState.from_state_dict(pol.state.state_dict(), "cpu"))
    m = _antithetic(4)
    for p in (pol, again):
        p.update(toy_loss(m), m, lambda p: p.clamp(0, 1))
    torch.testing.assert_close(again.probs, pol.probs)
    torch.testing.assert_close(again.state.control_variate["rows"],
                               pol.state.control_variate["rows"])
    assert int(again.state.control_variate["written"]) == 16


def test_variance_reducers_descend_the_toy_objective():
    torch.manual_seed(0)
    for antithetic, cv in ((True, False), (False, True), (True, True)):
        pol = Policy(PolicyConfig(lr=0.05, steps=300, antithetic=antithetic, control_variate=cv,
                                  cv_history=32), PolicyState(torch.full((5,), 0.5,
                                                                         dtype=torch.float64)))
        for _ in range(300):
            u = torch.rand(2, 5, dtype=torch.float64)
            m = (torch.cat([u, 1 - u]) if antithetic else torch.rand(4, 5, dtype=torch.float64)) \
                < pol.probs
            pol.update(toy_loss(m), m, lambda p: p.clamp(0, 1))
        p = pol.probs
        assert p[1] > 0.9 and p[0] < 0.1 and p[2] < 0.1 and p[3] < 0.1, (antithetic, cv, p)


def test_antithetic_uniforms_pair_rows_k_and_k_plus_half():
    from probprune.search import draw_uniforms
    u = draw_uniforms(6, 50, torch.Generator().manual_seed(0), antithetic=True)
    torch.testing.assert_close(u[3:], 1 - u[:3])
    masks = u < 0.5  # at s = 1/2 an antithetic pair is a mask and its complement
    assert torch.equal(masks[3:], ~masks[:3])
    plain = draw_uniforms(6, 50, torch.Generator().manual_seed(0), antithetic=False)
    assert plain.shape == (6, 50) and not torch.allclose(plain[3:], 1 - plain[:3])


def test_antithetic_refuses_an_odd_number_of_masks():
    from probprune.search import draw_uniforms
    with pytest.raises(ValueError, match="antithetic pairs need an even number of masks, got 3"):
        draw_uniforms(3, 5, torch.Generator().manual_seed(0), antithetic=True)
    pol = Policy(PolicyConfig(antithetic=True), PolicyState(S_TOY.clone()))
    m = torch.rand(3, 5, dtype=torch.float64) < S_TOY
    with pytest.raises(ValueError, match="antithetic pairs need an even number of masks, got 3"):
        pol.update(toy_loss(m), m, lambda p: p)

"""Tests for advantage.objectives.returns: they check the maths, not just that the code runs.

Three kinds of check:
1. hand-computed examples whose expected numbers are worked out in comments;
2. slow, obviously-correct references written as plain per-element, per-episode Python loops,
   compared with the library on random rollouts with random terminated / truncated flags;
3. identities between the estimators (GAE(lambda=1) = G - V, GAE(lambda=0) = delta, A^1 = delta,
   A^n for n >= T = GAE(lambda=1), GAE = lambda-mixture of the A^n, n-step returns = A^n + V),
   layout invariance (time-major dim=0 vs batch-major dim=1, extra trailing dims) and right padding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.testing import assert_close

from advantage.objectives.returns import (
    discounted_returns,
    episode_return_per_step,
    gae,
    n_step_advantage,
    n_step_returns,
    shift_to_next,
    td_residual,
    total_return,
)

F64 = torch.float64
SETTINGS = settings(max_examples=60, deadline=None)


def t64(x) -> torch.Tensor:
    return torch.tensor(x, dtype=F64)


def tb(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.bool)


# ---------------------------------------------------------------------------------------------------------
# Random rollouts
# ---------------------------------------------------------------------------------------------------------

def make_rollout(seed: int, T: int, N: int, p_term: float, p_trunc: float, consistent: bool = False,
                 extra: tuple[int, ...] = ()) -> dict[str, torch.Tensor]:
    """A random time-major (T, N, *extra) rollout.

    With `consistent=True`, next_values[t] == values[t+1] wherever step t is not an episode end (so the
    critic values telescope as in a real rollout); at terminated / truncated steps and at the last step
    next_values stays an independent random number (V of the final observation, which is *not* values[t+1]
    because values[t+1] belongs to the reset observation of the next episode).
    """
    g = torch.Generator().manual_seed(seed)
    shape = (T, N, *extra)
    rewards = torch.randn(shape, generator=g, dtype=F64)
    values = torch.randn(shape, generator=g, dtype=F64)
    next_values = torch.randn(shape, generator=g, dtype=F64)
    terminated = torch.rand(shape, generator=g) < p_term
    truncated = torch.rand(shape, generator=g) < p_trunc
    if consistent and T > 1:
        end = terminated | truncated
        next_values[:-1] = torch.where(end[:-1], next_values[:-1], values[1:])
    return dict(rewards=rewards, values=values, next_values=next_values, terminated=terminated,
                truncated=truncated)


probabilities = st.sampled_from([0.0, 0.15, 0.4])
seeds = st.integers(0, 2**31 - 1)
unit = st.floats(0.0, 1.0, allow_nan=False)


@st.composite
def rollouts(draw, consistent: bool = False, max_T: int = 8, max_N: int = 4):
    T = draw(st.integers(1, max_T))
    N = draw(st.integers(1, max_N))
    data = make_rollout(draw(seeds), T, N, draw(probabilities), draw(probabilities), consistent)
    return data


@st.composite
def padded_rollouts(draw, consistent: bool = False, max_T: int = 8, max_N: int = 4):
    """A rollout plus per-column real lengths (0..T) and a right-padding mask (T, N)."""
    data = draw(rollouts(consistent, max_T, max_N))
    T, N = data["rewards"].shape
    lengths = draw(st.lists(st.integers(0, T), min_size=N, max_size=N))
    mask = torch.zeros(T, N, dtype=F64)
    for n, length in enumerate(lengths):
        mask[:length, n] = 1.0
    data["mask"] = mask
    data["lengths"] = lengths
    return data


# ---------------------------------------------------------------------------------------------------------
# Slow, obviously-correct references: one column (list of floats) at a time, explicit episodes
# ---------------------------------------------------------------------------------------------------------

def episode_end(t: int, term: list[bool], trunc: list[bool], length: int) -> int:
    """Index of the last step of the episode containing step t (terminated, truncated or last real step)."""
    k = t
    while not (term[k] or trunc[k] or k == length - 1):
        k += 1
    return k


def ref_delta(k: int, r, v, nv, term, gamma) -> float:
    v_next = 0.0 if term[k] else nv[k]
    return r[k] + gamma * v_next - v[k]


def ref_discounted_returns(r, term, trunc, nv, gamma, length) -> list[float]:
    """G_t = sum_{k=t}^{e} gamma^(k-t) r_k  (+ gamma^(e-t+1) V(s_{e+1}) if the episode end e is not terminal)."""
    out = []
    for t in range(length):
        e = episode_end(t, term, trunc, length)
        g = 0.0
        for k in range(t, e + 1):
            g += gamma ** (k - t) * r[k]
        if nv is not None and not term[e]:
            g += gamma ** (e - t + 1) * nv[e]
        out.append(g)
    return out


def ref_gae(r, v, nv, term, trunc, gamma, lam, length) -> list[float]:
    """A_t = sum_{k=t}^{e} (gamma lambda)^(k-t) delta_k, summed directly (no recursion)."""
    out = []
    for t in range(length):
        e = episode_end(t, term, trunc, length)
        a = 0.0
        for k in range(t, e + 1):
            a += (gamma * lam) ** (k - t) * ref_delta(k, r, v, nv, term, gamma)
        out.append(a)
    return out


def ref_n_step_advantage(r, v, nv, term, trunc, gamma, n, length) -> list[float]:
    """A^n_t = sum_{k=t}^{min(t+n-1, e)} gamma^(k-t) delta_k."""
    out = []
    for t in range(length):
        e = episode_end(t, term, trunc, length)
        a = 0.0
        for k in range(t, min(t + n - 1, e) + 1):
            a += gamma ** (k - t) * ref_delta(k, r, v, nv, term, gamma)
        out.append(a)
    return out


def ref_n_step_return_telescoped(r, v, nv, term, trunc, gamma, n, length) -> list[float]:
    """G^(n)_t = sum_{k<m} gamma^k r_{t+k} + gamma^m V(s_{t+m}), m = min(n, steps left in the episode).

    V(s_{t+m}) is values[t+m] inside the episode, 0 after a terminal step and V(final obs) = next_values
    after a truncated / last step. Valid for consistent rollouts only (next_values[t] = values[t+1] inside
    an episode).
    """
    out = []
    for t in range(length):
        e = episode_end(t, term, trunc, length)
        m = min(n, e - t + 1)
        g = sum(gamma ** k * r[t + k] for k in range(m))
        last = t + m - 1
        if last == e:
            bootstrap = 0.0 if term[e] else nv[e]
        else:
            bootstrap = v[t + m]
        out.append(g + gamma ** m * bootstrap)
    return out


def apply_columns(ref, data, lengths=None, **kwargs) -> torch.Tensor:
    """Run a one-column reference on every column n of time-major (T, N) data; padding gives 0."""
    T, N = data["rewards"].shape
    out = torch.zeros(T, N, dtype=F64)
    for n in range(N):
        length = T if lengths is None else lengths[n]
        col = {key: data[key][:, n].tolist() for key in ("rewards", "values", "next_values", "terminated",
                                                           "truncated")}
        values = ref(col, length, **kwargs)
        for t in range(length):
            out[t, n] = values[t]
    return out


def col_discounted(col, length, gamma, bootstrap=True):
    return ref_discounted_returns(col["rewards"], col["terminated"], col["truncated"],
                                  col["next_values"] if bootstrap else None, gamma, length)


def col_gae(col, length, gamma, lam):
    return ref_gae(col["rewards"], col["values"], col["next_values"], col["terminated"], col["truncated"],
                   gamma, lam, length)


def col_n_step(col, length, gamma, n):
    return ref_n_step_advantage(col["rewards"], col["values"], col["next_values"], col["terminated"],
                                col["truncated"], gamma, n, length)


def col_n_step_return(col, length, gamma, n):
    return ref_n_step_return_telescoped(col["rewards"], col["values"], col["next_values"], col["terminated"],
                                        col["truncated"], gamma, n, length)


def col_episode_return(col, length, gamma):
    """psi_1: every step gets sum_{k=s}^{e} gamma^(k-s) r_k of its episode [s, e]."""
    r, term, trunc = col["rewards"], col["terminated"], col["truncated"]
    out = [0.0] * length
    start = 0
    while start < length:
        e = episode_end(start, term, trunc, length)
        ret = sum(gamma ** (k - start) * r[k] for k in range(start, e + 1))
        for k in range(start, e + 1):
            out[k] = ret
        start = e + 1
    return out


# ---------------------------------------------------------------------------------------------------------
# 1. Hand-computed examples
# ---------------------------------------------------------------------------------------------------------

class TestTotalReturn:
    def test_undiscounted_and_discounted(self):
        # Two trajectories as columns of a (T=3, N=2) time-major tensor.
        rewards = t64([[1.0, 4.0], [2.0, 5.0], [3.0, 6.0]])
        # gamma=1: 1+2+3 = 6, 4+5+6 = 15
        assert_close(total_return(rewards), t64([6.0, 15.0]))
        # gamma=0.5: 1 + 0.5*2 + 0.25*3 = 2.75 ; 4 + 0.5*5 + 0.25*6 = 8
        assert_close(total_return(rewards, gamma=0.5), t64([2.75, 8.0]))

    def test_mask_and_batch_major(self):
        rewards = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 1e6]])  # (B=2, T=3), row 1 padded at t=2
        mask = t64([[1, 1, 1], [1, 1, 0]])
        # row 0: 1 + 0.5*2 + 0.25*3 = 2.75 ; row 1: 4 + 0.5*5 = 6.5 (the 1e6 is padding)
        assert_close(total_return(rewards, 0.5, mask=mask, dim=1), t64([2.75, 6.5]))


class TestDiscountedReturns:
    def test_no_bootstrap(self):
        # r = [1,2,3], gamma = 0.5: G2 = 3 ; G1 = 2 + 0.5*3 = 3.5 ; G0 = 1 + 0.5*3.5 = 2.75
        assert_close(discounted_returns(t64([1.0, 2.0, 3.0]), 0.5), t64([2.75, 3.5, 3.0]))

    def test_last_step_bootstraps_from_next_values(self):
        # The rollout was cut after t=2 mid-episode: G2 = 3 + 0.5*V(s_3) = 3 + 0.5*4 = 5
        # G1 = 2 + 0.5*5 = 4.5 ; G0 = 1 + 0.5*4.5 = 3.25
        nv = t64([100.0, 200.0, 4.0])  # only next_values[2] may matter: no other step is an episode end
        assert_close(discounted_returns(t64([1.0, 2.0, 3.0]), 0.5, next_values=nv), t64([3.25, 4.5, 5.0]))

    def test_terminated_mid_rollout(self):
        r = t64([1.0, 2.0, 3.0, 4.0])
        nv = t64([10.0, 20.0, 30.0, 40.0])
        term = tb([False, True, False, False])
        # episode 2 (t=2,3), cut at the end of the rollout: G3 = 4 + 0.5*40 = 24 ; G2 = 3 + 0.5*24 = 15
        # episode 1 ends with a terminal state at t=1: G1 = 2 (no bootstrap) ; G0 = 1 + 0.5*2 = 2
        assert_close(discounted_returns(r, 0.5, terminated=term, next_values=nv), t64([2.0, 2.0, 15.0, 24.0]))

    def test_truncated_mid_rollout(self):
        r = t64([1.0, 2.0, 3.0, 4.0])
        nv = t64([10.0, 20.0, 30.0, 40.0])
        trunc = tb([False, True, False, False])
        # truncated at t=1: G1 = 2 + 0.5*V(final obs) = 2 + 0.5*20 = 12 ; G0 = 1 + 0.5*12 = 7
        # G2, G3 as before: 15, 24
        assert_close(discounted_returns(r, 0.5, truncated=trunc, next_values=nv), t64([7.0, 12.0, 15.0, 24.0]))
        # without next_values a truncated step contributes nothing beyond its reward: G1 = 2, G0 = 2, G3 = 4,
        # G2 = 3 + 0.5*4 = 5
        assert_close(discounted_returns(r, 0.5, truncated=trunc), t64([2.0, 2.0, 5.0, 4.0]))

    def test_terminated_wins_over_truncated(self):
        r = t64([1.0, 2.0])
        flag = tb([True, False])
        # t=0 both terminated and truncated: the next state is terminal, G0 = 1
        out = discounted_returns(r, 0.5, terminated=flag, truncated=flag, next_values=t64([50.0, 0.0]))
        assert_close(out, t64([1.0, 2.0]))


class TestEpisodeReturnPerStep:
    def test_single_episode(self):
        # 1 + 0.5*2 + 0.25*3 + 0.125*4 = 3.25 at every step
        out = episode_return_per_step(t64([1.0, 2.0, 3.0, 4.0]), 0.5)
        assert_close(out, t64([3.25] * 4))

    @pytest.mark.parametrize("flag", ["terminated", "truncated"])
    def test_two_episodes(self, flag):
        # episode [0,1]: 1 + 0.5*2 = 2 ; episode [2,3]: 3 + 0.5*4 = 5; nothing is bootstrapped either way
        flags = {flag: tb([False, True, False, False])}
        out = episode_return_per_step(t64([1.0, 2.0, 3.0, 4.0]), 0.5, **flags)
        assert_close(out, t64([2.0, 2.0, 5.0, 5.0]))

    def test_mask(self):
        r = t64([[1.0, 2.0, 3.0], [4.0, 1e6, 1e6]])  # (B, T), row 1 has one real step
        mask = t64([[1, 1, 1], [1, 0, 0]])
        # row 0: 1 + 0.5*2 + 0.25*3 = 2.75 ; row 1: 4, padding 0
        out = episode_return_per_step(r, 0.5, mask=mask, dim=1)
        assert_close(out, t64([[2.75, 2.75, 2.75], [4.0, 0.0, 0.0]]))


class TestTDResidual:
    def test_hand(self):
        r = t64([1.0, 2.0, 3.0])
        v = t64([1.0, 2.0, 3.0])
        nv = t64([2.0, 3.0, 10.0])
        # delta_t = r_t + 0.5 V(s_{t+1}) - V(s_t)
        # d0 = 1 + 0.5*2 - 1 = 1 ; d1 = 2 + 0.5*3 - 2 = 1.5 ; d2 = 3 + 0.5*10 - 3 = 5
        assert_close(td_residual(r, v, nv, 0.5), t64([1.0, 1.5, 5.0]))
        # terminated at t=1: d1 = 2 + 0 - 2 = 0
        assert_close(td_residual(r, v, nv, 0.5, terminated=tb([False, True, False])), t64([1.0, 0.0, 5.0]))
        # masked step is 0
        assert_close(td_residual(r, v, nv, 0.5, mask=t64([1, 1, 0])), t64([1.0, 1.5, 0.0]))


# Shared hand rollout for GAE / n-step: T = 4, gamma = 0.5.
R4 = [1.0, 2.0, 3.0, 4.0]
V4 = [1.0, 2.0, 3.0, 4.0]
NV4 = [2.0, 3.0, 4.0, 8.0]  # = V shifted, with V(s_4) = 8 for the cut after the last step
# deltas, no flags: d0 = 1 + 0.5*2 - 1 = 1 ; d1 = 2 + 0.5*3 - 2 = 1.5 ; d2 = 3 + 0.5*4 - 3 = 2 ; d3 = 4 + 0.5*8 - 4 = 4
NV4_TRUNC = [2.0, 6.0, 4.0, 8.0]  # truncated at t=1: V(final obs) = 6, while V4[2] = 3 is the reset obs


class TestGAEHand:
    def test_no_episode_end(self):
        # gamma*lambda = 0.25: A3 = 4 (last step bootstraps V(s_4)=8 inside d3) ; A2 = 2 + 0.25*4 = 3
        # A1 = 1.5 + 0.25*3 = 2.25 ; A0 = 1 + 0.25*2.25 = 1.5625
        out = gae(t64(R4), t64(V4), t64(NV4), 0.5, 0.5)
        assert_close(out, t64([1.5625, 2.25, 3.0, 4.0]))

    def test_lambda_one_is_monte_carlo(self):
        # gamma*lambda = 0.5: A3 = 4 ; A2 = 2 + 2 = 4 ; A1 = 1.5 + 2 = 3.5 ; A0 = 1 + 1.75 = 2.75
        # = G - V with G = [3.75, 5.5, 7, 8] (G3 = 4 + 0.5*8, G2 = 3 + 0.5*8, ...)
        out = gae(t64(R4), t64(V4), t64(NV4), 0.5, 1.0)
        assert_close(out, t64([2.75, 3.5, 4.0, 4.0]))

    def test_terminated_mid_rollout(self):
        # terminated at t=1: d1 = 2 + 0 - 2 = 0, and the recursion stops there.
        # A3 = 4 ; A2 = 3 ; A1 = 0 ; A0 = 1 + 0.25*0 = 1
        out = gae(t64(R4), t64(V4), t64(NV4), 0.5, 0.5, terminated=tb([False, True, False, False]))
        assert_close(out, t64([1.0, 0.0, 3.0, 4.0]))

    def test_truncated_mid_rollout_bootstraps_final_obs(self):
        # truncated at t=1 with V(final obs) = 6: d1 = 2 + 0.5*6 - 2 = 3, recursion stops there.
        # A3 = 4 ; A2 = 3 ; A1 = 3 ; A0 = 1 + 0.25*3 = 1.75
        out = gae(t64(R4), t64(V4), t64(NV4_TRUNC), 0.5, 0.5, truncated=tb([False, True, False, False]))
        assert_close(out, t64([1.75, 3.0, 3.0, 4.0]))

    def test_last_step_terminated_does_not_bootstrap(self):
        # terminated at t=3: d3 = 4 + 0 - 4 = 0 ; A2 = 2 ; A1 = 1.5 + 0.25*2 = 2 ; A0 = 1 + 0.25*2 = 1.5
        out = gae(t64(R4), t64(V4), t64(NV4), 0.5, 0.5, terminated=tb([False, False, False, True]))
        assert_close(out, t64([1.5, 2.0, 2.0, 0.0]))


class TestNStepHand:
    def test_no_episode_end(self):
        # deltas [1, 1.5, 2, 4], gamma 0.5
        # n=1: the deltas
        assert_close(n_step_advantage(t64(R4), t64(V4), t64(NV4), 0.5, 1), t64([1.0, 1.5, 2.0, 4.0]))
        # n=2: A_t = d_t + 0.5 d_{t+1}: [1+0.75, 1.5+1, 2+2, 4] = [1.75, 2.5, 4, 4]
        # check A0 telescoped: r0 + 0.5 r1 + 0.25 V(s2) - V(s0) = 1 + 1 + 0.75 - 1 = 1.75
        assert_close(n_step_advantage(t64(R4), t64(V4), t64(NV4), 0.5, 2), t64([1.75, 2.5, 4.0, 4.0]))
        # n=3: A0 = 1 + 0.75 + 0.25*2 = 2.25 ; A1 = 1.5 + 1 + 0.25*4 = 3.5 ; A2 = 4 ; A3 = 4
        assert_close(n_step_advantage(t64(R4), t64(V4), t64(NV4), 0.5, 3), t64([2.25, 3.5, 4.0, 4.0]))

    def test_terminated(self):
        # terminated at t=1: deltas [1, 0, 2, 4]; n=2: A0 = 1 + 0.5*0 = 1 (telescoped: 1 + 0.5*2 + 0 - 1 = 1)
        # A1 = 0 (episode over), A2 = 2 + 0.5*4 = 4, A3 = 4
        out = n_step_advantage(t64(R4), t64(V4), t64(NV4), 0.5, 2, terminated=tb([False, True, False, False]))
        assert_close(out, t64([1.0, 0.0, 4.0, 4.0]))

    def test_truncated(self):
        # truncated at t=1 with V(final obs) = 6: deltas [1, 3, 2, 4]; n=2: A0 = 1 + 0.5*3 = 2.5
        # (telescoped: r0 + 0.5 r1 + 0.25*6 - V0 = 1 + 1 + 1.5 - 1 = 2.5) ; A1 = 3 ; A2 = 4 ; A3 = 4
        out = n_step_advantage(t64(R4), t64(V4), t64(NV4_TRUNC), 0.5, 2, truncated=tb([False, True, False, False]))
        assert_close(out, t64([2.5, 3.0, 4.0, 4.0]))

    def test_returns_hand(self):
        # n=2 returns = A + V = [1.75+1, 2.5+2, 4+3, 4+4]
        assert_close(n_step_returns(t64(R4), t64(V4), t64(NV4), 0.5, 2), t64([2.75, 4.5, 7.0, 8.0]))

    def test_n_must_be_positive(self):
        with pytest.raises(ValueError):
            n_step_advantage(t64(R4), t64(V4), t64(NV4), 0.5, 0)


def test_shift_to_next():
    v = t64([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    assert_close(shift_to_next(v, 9.0, dim=1), t64([[2.0, 3.0, 9.0], [5.0, 6.0, 9.0]]))
    assert_close(shift_to_next(v, 0.0, dim=0), t64([[4.0, 5.0, 6.0], [0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------------------------------------------------
# 2. Library vs slow references on random rollouts with random flags (and random padding)
# ---------------------------------------------------------------------------------------------------------

@SETTINGS
@given(padded_rollouts(), unit)
def test_discounted_returns_matches_reference(data, gamma):
    d, mask, lengths = data, data["mask"], data["lengths"]
    got = discounted_returns(d["rewards"], gamma, d["terminated"], d["truncated"], d["next_values"], mask)
    assert_close(got, apply_columns(col_discounted, d, lengths, gamma=gamma))
    got_mc = discounted_returns(d["rewards"], gamma, d["terminated"], d["truncated"], None, mask)
    assert_close(got_mc, apply_columns(col_discounted, d, lengths, gamma=gamma, bootstrap=False))


@SETTINGS
@given(padded_rollouts(), unit, unit)
def test_gae_matches_reference(data, gamma, lam):
    d, mask, lengths = data, data["mask"], data["lengths"]
    got = gae(d["rewards"], d["values"], d["next_values"], gamma, lam, d["terminated"], d["truncated"], mask)
    assert_close(got, apply_columns(col_gae, d, lengths, gamma=gamma, lam=lam))


@SETTINGS
@given(padded_rollouts(), unit, st.integers(1, 10))
def test_n_step_advantage_matches_reference(data, gamma, n):
    d, mask, lengths = data, data["mask"], data["lengths"]
    got = n_step_advantage(d["rewards"], d["values"], d["next_values"], gamma, n, d["terminated"], d["truncated"],
                           mask)
    assert_close(got, apply_columns(col_n_step, d, lengths, gamma=gamma, n=n))


@SETTINGS
@given(padded_rollouts(consistent=True), unit, st.integers(1, 10))
def test_n_step_returns_match_telescoped_definition(data, gamma, n):
    # On consistent rollouts the delta-sum equals sum_{k<n} gamma^k r_{t+k} + gamma^n V(s_{t+n}).
    d, mask, lengths = data, data["mask"], data["lengths"]
    got = n_step_returns(d["rewards"], d["values"], d["next_values"], gamma, n, d["terminated"], d["truncated"],
                         mask)
    assert_close(got, apply_columns(col_n_step_return, d, lengths, gamma=gamma, n=n))


@SETTINGS
@given(padded_rollouts(), unit)
def test_episode_return_per_step_matches_reference(data, gamma):
    d, mask, lengths = data, data["mask"], data["lengths"]
    got = episode_return_per_step(d["rewards"], gamma, d["terminated"], d["truncated"], mask)
    assert_close(got, apply_columns(col_episode_return, d, lengths, gamma=gamma))


@SETTINGS
@given(padded_rollouts(), unit)
def test_total_return_matches_reference(data, gamma):
    d, lengths = data, data["lengths"]
    T, N = d["rewards"].shape
    expected = t64([sum(gamma ** t * float(d["rewards"][t, n]) for t in range(lengths[n])) for n in range(N)])
    assert_close(total_return(d["rewards"], gamma, mask=d["mask"]), expected)


# ---------------------------------------------------------------------------------------------------------
# 3. Identities between the estimators
# ---------------------------------------------------------------------------------------------------------

@SETTINGS
@given(padded_rollouts(consistent=True), unit)
def test_gae_lambda_one_is_returns_minus_values(data, gamma):
    d, mask = data, data["mask"]
    a = gae(d["rewards"], d["values"], d["next_values"], gamma, 1.0, d["terminated"], d["truncated"], mask)
    g = discounted_returns(d["rewards"], gamma, d["terminated"], d["truncated"], next_values=d["next_values"],
                           mask=mask)
    assert_close(a, (g - d["values"]) * mask)


@SETTINGS
@given(padded_rollouts(consistent=True), unit, unit)
def test_gae_with_returns_gives_the_lambda_return_the_monte_carlo_return_at_lambda_one(data, gamma, lam):
    d, mask = data, data["mask"]
    args = (d["rewards"], d["values"], d["next_values"], gamma, lam, d["terminated"], d["truncated"], mask)
    advantages, returns = gae(*args, with_returns=True)
    assert_close(advantages, gae(*args))
    assert_close(returns, torch.where(mask.bool(), advantages + d["values"], torch.zeros_like(returns)))
    _, monte_carlo = gae(*args[:4], 1.0, *args[5:], with_returns=True)
    g = discounted_returns(d["rewards"], gamma, d["terminated"], d["truncated"], next_values=d["next_values"],
                           mask=mask)
    assert_close(monte_carlo, g)
    poisoned = torch.where(mask.bool(), d["values"], torch.full_like(d["values"], float("nan")))
    assert not gae(*args[:1], poisoned, *args[2:], with_returns=True)[1].isnan().any()  # padding: 0, not V


@SETTINGS
@given(padded_rollouts(), unit)
def test_gae_lambda_zero_is_td_residual(data, gamma):
    d, mask = data, data["mask"]
    a = gae(d["rewards"], d["values"], d["next_values"], gamma, 0.0, d["terminated"], d["truncated"], mask)
    delta = td_residual(d["rewards"], d["values"], d["next_values"], gamma, d["terminated"], mask)
    assert_close(a, delta)


@SETTINGS
@given(padded_rollouts(), unit)
def test_one_step_advantage_is_td_residual(data, gamma):
    d, mask = data, data["mask"]
    a1 = n_step_advantage(d["rewards"], d["values"], d["next_values"], gamma, 1, d["terminated"], d["truncated"],
                          mask)
    delta = td_residual(d["rewards"], d["values"], d["next_values"], gamma, d["terminated"], mask)
    assert_close(a1, delta)


@SETTINGS
@given(padded_rollouts(), unit, st.integers(0, 5))
def test_long_n_step_advantage_is_gae_lambda_one(data, gamma, extra):
    d, mask = data, data["mask"]
    T = d["rewards"].shape[0]
    an = n_step_advantage(d["rewards"], d["values"], d["next_values"], gamma, T + extra, d["terminated"],
                          d["truncated"], mask)
    a = gae(d["rewards"], d["values"], d["next_values"], gamma, 1.0, d["terminated"], d["truncated"], mask)
    assert_close(an, a)


def lambda_mixture(d, gamma, lam, mask=None):
    """(1-lambda) sum_{n=1}^{T-1} lambda^(n-1) A^n + lambda^(T-1) A^T  (A^n constant for n >= T)."""
    T = d["rewards"].shape[0]
    total = torch.zeros_like(d["rewards"])
    for n in range(1, T + 1):
        a_n = n_step_advantage(d["rewards"], d["values"], d["next_values"], gamma, n, d["terminated"],
                               d["truncated"], mask)
        weight = (1.0 - lam) * lam ** (n - 1) if n < T else lam ** (T - 1)
        total = total + weight * a_n
    return total


@SETTINGS
@given(rollouts(consistent=True), unit, unit)
def test_gae_is_lambda_mixture_of_n_step_advantages_without_episode_ends(data, gamma, lam):
    d = dict(data)
    d["terminated"] = torch.zeros_like(d["terminated"])
    d["truncated"] = torch.zeros_like(d["truncated"])
    a = gae(d["rewards"], d["values"], d["next_values"], gamma, lam)
    assert_close(a, lambda_mixture(d, gamma, lam))


@SETTINGS
@given(padded_rollouts(), unit, unit)
def test_gae_is_lambda_mixture_with_episode_ends_and_padding(data, gamma, lam):
    # The identity is coefficient-wise (gamma^k delta_{t+k} gets weight sum_{n>k} w_n = lambda^k), and every
    # A^n is cut at the same episode end, so it holds with ends and padding too.
    d, mask = data, data["mask"]
    a = gae(d["rewards"], d["values"], d["next_values"], gamma, lam, d["terminated"], d["truncated"], mask)
    assert_close(a, lambda_mixture(d, gamma, lam, mask))


@SETTINGS
@given(padded_rollouts(), unit, st.integers(1, 10))
def test_n_step_returns_are_advantage_plus_values(data, gamma, n):
    d, mask = data, data["mask"]
    args = (d["rewards"], d["values"], d["next_values"], gamma, n, d["terminated"], d["truncated"], mask)
    assert_close(n_step_returns(*args), (n_step_advantage(*args) + d["values"]) * mask)


# ---------------------------------------------------------------------------------------------------------
# 4. Layout: time-major (T, N) with dim=0 vs batch-major (N, T) with dim=1; trailing dims
# ---------------------------------------------------------------------------------------------------------

def all_functions(d, gamma, lam, n, mask, dim):
    """Every time-axis function of the module on the same data, as a dict of outputs."""
    r, v, nv, term, trunc = d["rewards"], d["values"], d["next_values"], d["terminated"], d["truncated"]
    return {
        "total_return": total_return(r, gamma, mask, dim),
        "discounted_returns": discounted_returns(r, gamma, term, trunc, nv, mask, dim),
        "episode_return_per_step": episode_return_per_step(r, gamma, term, trunc, mask, dim),
        "n_step_advantage": n_step_advantage(r, v, nv, gamma, n, term, trunc, mask, dim),
        "n_step_returns": n_step_returns(r, v, nv, gamma, n, term, trunc, mask, dim),
        "gae": gae(r, v, nv, gamma, lam, term, trunc, mask, dim),
    }


@SETTINGS
@given(padded_rollouts(), unit, unit, st.integers(1, 4))
def test_time_major_and_batch_major_agree(data, gamma, lam, n):
    d = data
    time_major = all_functions(d, gamma, lam, n, d["mask"], dim=0)
    transposed = {key: d[key].T.contiguous() for key in ("rewards", "values", "next_values", "terminated",
                                                          "truncated")}
    batch_major = all_functions(transposed, gamma, lam, n, d["mask"].T.contiguous(), dim=1)
    for name, out in time_major.items():
        expected = out if name == "total_return" else out.T
        assert_close(batch_major[name], expected, msg=name)


@SETTINGS
@given(seeds, st.integers(1, 6), st.integers(1, 3), st.integers(1, 3), unit, unit, st.integers(1, 4))
def test_trailing_dims_are_carried(seed, T, N, K, gamma, lam, n):
    # (T, N, K) with dim=0 must equal K separate (T, N) computations; (N, T, K) with dim=1 likewise.
    d = make_rollout(seed, T, N, 0.2, 0.2, extra=(K,))
    g = torch.Generator().manual_seed(seed + 1)
    lengths = torch.randint(0, T + 1, (N, K), generator=g)
    mask = (torch.arange(T).reshape(T, 1, 1) < lengths.unsqueeze(0)).to(F64)
    whole = all_functions(d, gamma, lam, n, mask, dim=0)
    batch_major_data = {key: value.transpose(0, 1) for key, value in d.items()}
    whole_bm = all_functions(batch_major_data, gamma, lam, n, mask.transpose(0, 1), dim=1)
    for k in range(K):
        part = all_functions({key: value[..., k] for key, value in d.items()}, gamma, lam, n, mask[..., k], dim=0)
        for name, out in part.items():
            assert_close(whole[name][..., k], out, msg=name)
            expected_bm = out if name == "total_return" else out.T
            assert_close(whole_bm[name][..., k], expected_bm, msg=name)


# ---------------------------------------------------------------------------------------------------------
# 5. Right padding
# ---------------------------------------------------------------------------------------------------------

@SETTINGS
@given(padded_rollouts(), unit, unit, st.integers(1, 4), seeds)
def test_padding_garbage_never_changes_real_outputs(data, gamma, lam, n, seed):
    d, mask = data, data["mask"]
    pad = mask == 0
    g = torch.Generator().manual_seed(seed)
    clean = {key: value.clone() for key, value in d.items() if key not in ("mask", "lengths")}
    dirty = {key: value.clone() for key, value in clean.items()}
    for key in ("rewards", "values", "next_values"):
        clean[key][pad] = 0.0
        dirty[key][pad] = 1e6
    for key in ("terminated", "truncated"):
        clean[key][pad] = False
        dirty[key][pad] = torch.rand(int(pad.sum()), generator=g) < 0.5
    out_clean = all_functions(clean, gamma, lam, n, mask, dim=0)
    out_dirty = all_functions(dirty, gamma, lam, n, mask, dim=0)
    for name in out_clean:
        assert_close(out_dirty[name], out_clean[name], msg=name)
        if name != "total_return":
            assert torch.all(out_dirty[name][pad] == 0), name
    # And each padded column equals the same column cut to its real length, without a mask.
    for col, length in enumerate(d["lengths"]):
        if length == 0:
            continue
        cut = {key: value[:length, col] for key, value in dirty.items()}
        out_cut = all_functions(cut, gamma, lam, n, None, dim=0)
        for name, out in out_cut.items():
            got = out_dirty[name][col] if name == "total_return" else out_dirty[name][:length, col]
            assert_close(got, out, msg=name)


class TestPaddingHand:
    """Language-model layout (B, T), dim=1: row 1 has 2 real steps then padding full of garbage."""

    r = t64([[1.0, 2.0, 3.0], [1.0, 2.0, 1e6]])
    v = t64([[1.0, 2.0, 3.0], [1.0, 2.0, 1e6]])
    nv = t64([[2.0, 3.0, 10.0], [2.0, 6.0, 1e6]])  # row 1: V after its last real step = 6
    mask = t64([[1, 1, 1], [1, 1, 0]])

    def test_last_real_step_bootstraps(self):
        # row 1, gamma 0.5: G1 = 2 + 0.5*6 = 5 ; G0 = 1 + 0.5*5 = 3.5 ; padded 0
        # row 0: G2 = 3 + 5 = 8 ; G1 = 2 + 4 = 6 ; G0 = 1 + 3 = 4
        out = discounted_returns(self.r, 0.5, next_values=self.nv, mask=self.mask, dim=1)
        assert_close(out, t64([[4.0, 6.0, 8.0], [3.5, 5.0, 0.0]]))
        # GAE lambda 0.5, row 1: d1 = 2 + 3 - 2 = 3 ; d0 = 1 + 1 - 1 = 1 ; A1 = 3 ; A0 = 1 + 0.25*3 = 1.75
        # row 0: d = [1, 1.5, 5] ; A2 = 5 ; A1 = 1.5 + 1.25 = 2.75 ; A0 = 1 + 0.25*2.75 = 1.6875
        out = gae(self.r, self.v, self.nv, 0.5, 0.5, mask=self.mask, dim=1)
        assert_close(out, t64([[1.6875, 2.75, 5.0], [1.75, 3.0, 0.0]]))

    def test_last_real_step_terminated(self):
        term = tb([[False, False, True], [False, True, True]])  # the garbage flag at (1, 2) is padding
        # row 1: G1 = 2 ; G0 = 1 + 1 = 2 ; row 0: G2 = 3 ; G1 = 2 + 1.5 = 3.5 ; G0 = 1 + 1.75 = 2.75
        out = discounted_returns(self.r, 0.5, terminated=term, next_values=self.nv, mask=self.mask, dim=1)
        assert_close(out, t64([[2.75, 3.5, 3.0], [2.0, 2.0, 0.0]]))
        # GAE: row 1: d1 = 2 - 2 = 0 ; d0 = 1 ; A = [1, 0] ; row 0: d2 = 3 - 3 = 0 ; A1 = 1.5 ; A0 = 1 + 0.375
        out = gae(self.r, self.v, self.nv, 0.5, 0.5, terminated=term, mask=self.mask, dim=1)
        assert_close(out, t64([[1.375, 1.5, 0.0], [1.0, 0.0, 0.0]]))

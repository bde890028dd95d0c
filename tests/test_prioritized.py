"""PrioritizedReplayBuffer: proportional sampling, importance weights, the sum tree."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdqn import PrioritizedReplayBuffer
from reference_buffer import ReferenceBuffer
from test_replay import assert_matches, play

ALPHA, EPS = 0.7, 1e-6


def filled(capacity=120, num_envs=2, steps=50, seed=0, p_end=0.1):
    """A buffer after `steps` steps, its reference, and a function that plays more steps."""
    buf = PrioritizedReplayBuffer(capacity, (4, 2, 2), frame_stack=4, num_envs=num_envs, n_step=2, alpha=ALPHA,
                                  eps=EPS, seed=seed)
    ref = ReferenceBuffer(capacity, num_envs, 4, 2, 0.99)
    game = play(buf, ref, np.random.default_rng(seed), 10**9, p_end=p_end)

    def more(steps):
        for _ in range(steps):
            next(game)

    more(steps)
    return buf, ref, more


def test_frequencies_are_proportional_to_priority_to_the_alpha():
    buf, _, _ = filled()
    valid = buf.valid_indices()
    priorities = np.random.default_rng(1).uniform(0.0, 5.0, valid.size)
    buf.update_priorities(valid, priorities)
    draws = np.concatenate([buf.sample(500).indices for _ in range(400)])
    counts = np.array([np.count_nonzero(draws == i) for i in valid])
    assert counts.sum() == draws.size
    p = (priorities + EPS) ** ALPHA
    expected = draws.size * p / p.sum()
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < valid.size + 6 * np.sqrt(2 * valid.size)


def test_weights_match_a_naive_computation():
    buf, ref, _ = filled()
    valid = buf.valid_indices()
    priorities = np.random.default_rng(2).uniform(0.1, 3.0, valid.size)
    buf.update_priorities(valid, priorities)
    mass = dict(zip(valid.tolist(), (priorities + EPS) ** ALPHA))
    total = sum(mass.values())
    for beta in [0.0, 0.4, 1.0]:
        batch = buf.sample(64, beta=beta)
        assert_matches(batch, ref.valid())
        naive = (valid.size * np.array([mass[i] for i in batch.indices]) / total) ** -beta
        max_weight = (valid.size * min(mass.values()) / total) ** -beta
        np.testing.assert_allclose(batch.weights, naive / max_weight, rtol=1e-5)


def test_stratified_draws_cover_equal_priorities_once_each():
    buf, _, _ = filled()
    valid = buf.valid_indices()
    assert sorted(buf.sample(valid.size).indices) == valid.tolist()


def test_new_transitions_get_the_largest_priority_seen():
    buf, _, more = filled(steps=20, p_end=0.0)
    valid = buf.valid_indices()
    buf.update_priorities(valid, np.linspace(0.5, 9.0, valid.size))
    more(10)
    new = np.setdiff1d(buf.valid_indices(), valid)
    assert new.size > 0
    np.testing.assert_allclose(buf.sampling_mass(new), (9.0 + EPS) ** ALPHA)


def test_priorities_survive_wrap_around_and_stale_indices_are_ignored():
    buf, _, more = filled(capacity=60, steps=25, p_end=0.0)
    old = buf.valid_indices()
    priorities = np.random.default_rng(3).uniform(0.1, 2.0, old.size)
    buf.update_priorities(old, priorities)
    more(12)
    still = np.isin(old, buf.valid_indices())
    assert still.any() and not still.all()
    np.testing.assert_allclose(buf.sampling_mass(old[still]), (priorities[still] + EPS) ** ALPHA)
    total = buf.priority_total()
    buf.update_priorities(old[~still], np.full((~still).sum(), 100.0))  # overwritten since: ignored
    assert buf.priority_total() == total
    np.testing.assert_array_equal(buf.sampling_mass(old[~still]), 0.0)


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from([0.0, 0.5, 1.0]))
def test_tree_total_equals_its_leaves_after_random_operations(seed, alpha):
    rng = np.random.default_rng(seed)
    buf = PrioritizedReplayBuffer(40, (3,), obs_dtype=np.float32, num_envs=2, n_step=3, alpha=alpha, seed=seed)
    ref = ReferenceBuffer(40, 2, 1, 3, 0.99)
    priority = {}  # index -> priority + eps, the naive model of the tree
    largest = 1.0
    for _ in play(buf, ref, rng, 200, p_end=0.2, p_restart=0.1):
        valid = set(ref.valid())
        priority = {i: priority.get(i, largest) for i in valid}
        if valid and rng.random() < 0.3:
            batch = buf.sample(8)
            new = rng.exponential(2.0, 8)
            buf.update_priorities(batch.indices, new)
            for i, p in zip(batch.indices.tolist(), new):
                priority[i] = p + buf.eps
                largest = max(largest, p + buf.eps)
        indices = np.array(sorted(valid), dtype=np.int64)
        np.testing.assert_allclose(buf.sampling_mass(indices), [priority[i] ** alpha for i in indices.tolist()])
    leaves = buf._core.priority_leaves()
    assert np.count_nonzero(leaves) == len(priority)
    assert buf.priority_total() == pytest.approx(leaves.sum(), rel=1e-12)
    assert buf.priority_total() == pytest.approx(sum(p ** alpha for p in priority.values()), rel=1e-9)


def test_beta_is_settable_and_used_by_prefetchers():
    buf, _, _ = filled()
    valid = buf.valid_indices()
    buf.update_priorities(valid, np.random.default_rng(0).uniform(0.1, 3.0, valid.size))
    buf.beta = 0.0
    with buf.prefetch(32) as pf:
        np.testing.assert_array_equal(pf.next().weights, 1.0)
    buf.beta = 1.0
    with buf.prefetch(32) as pf:
        assert pf.next().weights.min() < 1.0


def test_alpha_and_eps_cannot_be_reassigned():
    """The tree holds (priority + eps) ** alpha: an assignment raises instead of being ignored."""
    buf, _, _ = filled()
    for name in ("alpha", "eps"):
        with pytest.raises(AttributeError, match=name):
            setattr(buf, name, 2.0)
    assert (buf.alpha, buf.eps) == (ALPHA, EPS)
    index = buf.valid_indices()[:1]
    buf.update_priorities(index, [3.0])
    np.testing.assert_allclose(buf.sampling_mass(index), (3.0 + EPS) ** ALPHA)

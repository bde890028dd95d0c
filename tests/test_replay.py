"""ReplayBuffer against a naive reference that stores whole transitions."""

import os

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fastdqn import ReplayBuffer
from reference_buffer import ReferenceBuffer


def start_stack(rng, k, frame_shape, dtype, values):
    """An episode's first observation, padded as envpool, gymnasium or anyone might."""
    frames = rng.integers(0, values, (k, *frame_shape)).astype(dtype)
    kind = rng.integers(4)
    if kind == 0:  # envpool: the first frame repeated
        frames[:] = frames[-1]
    elif kind == 1:  # zero padding
        frames[:-1] = 0
    elif kind == 2 and k > 2:  # some repeated, some not
        frames[: k // 2] = frames[k // 2]
    return frames if k > 1 else frames[0]


def play(buf, ref, rng, steps, values=256, p_end=0.1, p_skip=0.0, mirrors=(), p_restart=0.0):
    """Adds `steps` random steps of every env to both buffers (and to `mirrors`); yields after each.
    With probability `p_restart` a step is instead a restart of all envs or some, whose episodes
    `end_episodes` ends."""
    k, shape, dtype = buf.frame_stack, buf.frame_shape, buf.obs_dtype
    obs = [start_stack(rng, k, shape, dtype, values) for _ in range(buf.num_envs)]
    for _ in range(steps):
        if rng.random() < p_restart:
            some = np.flatnonzero(rng.random(buf.num_envs) < 0.5) if rng.random() < 0.5 else None
            for target in [buf, *mirrors]:
                target.end_episodes(some)
            ref.end_episodes(some)
            for e in range(buf.num_envs) if some is None else some:
                obs[e] = start_stack(rng, k, shape, dtype, values)
            yield
            continue
        envs = np.flatnonzero(rng.random(buf.num_envs) >= p_skip)
        frames = rng.integers(0, values, (len(envs), *shape)).astype(dtype)
        next_obs = np.stack([np.concatenate([obs[e][1:], f[None]]) if k > 1 else f for e, f in zip(envs, frames)]) \
            if len(envs) else np.empty((0, *buf.obs_shape), dtype)
        actions = rng.integers(0, 6, len(envs))
        rewards = rng.normal(size=len(envs)).astype(np.float32)
        terminated = rng.random(len(envs)) < p_end / 2
        truncated = ~terminated & (rng.random(len(envs)) < p_end / 2)
        for target in [buf, *mirrors]:
            target.add(np.stack([obs[e] for e in envs]) if len(envs) else next_obs, actions, rewards, next_obs,
                       terminated, truncated, env_ids=None if len(envs) == buf.num_envs and p_skip == 0 else envs)
        for row, e in enumerate(envs):
            ref.add(e, obs[e], actions[row], rewards[row], next_obs[row], terminated[row], truncated[row])
            ended = terminated[row] or truncated[row]
            obs[e] = start_stack(rng, k, shape, dtype, values) if ended else next_obs[row]
        yield


def assert_matches(batch, expected, rows=None):
    rows = range(len(batch.indices)) if rows is None else rows
    for b in rows:
        want = expected[int(batch.indices[b])]
        np.testing.assert_array_equal(batch.obs[b], want["obs"])
        np.testing.assert_array_equal(batch.next_obs[b], want["next_obs"])
        assert batch.actions[b] == want["action"]
        assert batch.rewards[b] == pytest.approx(want["reward"], rel=1e-5, abs=1e-5)
        assert batch.terminated[b] == want["terminated"]
        assert batch.discounts[b] == pytest.approx(want["discount"], rel=1e-6)


configs = st.fixed_dictionaries({
    "num_envs": st.integers(1, 3),
    "frame_stack": st.integers(1, 4),
    "n_step": st.integers(1, 5),
    "extra_slots": st.integers(0, 30),
    "vector": st.booleans(),
    "values": st.sampled_from([2, 256]),
    "p_end": st.sampled_from([0.02, 0.2, 0.6]),
    "p_skip": st.sampled_from([0.0, 0.3]),
    "p_restart": st.sampled_from([0.0, 0.1]),
    "steps": st.integers(1, 120),
    "gamma": st.sampled_from([0.0, 0.5, 0.99, 1.0]),
    "seed": st.integers(0, 2**32 - 1),
})


def make_buffers(c):
    k, n = c["frame_stack"], c["n_step"]
    slots = 2 * (k + n) + 2 + c["extra_slots"]
    if c["vector"] and k == 1:
        obs_shape, dtype = (3,), np.float32
    else:
        obs_shape, dtype = ((k, 2, 3) if k > 1 else (2, 3)), np.uint8
    buf = ReplayBuffer(slots * c["num_envs"], obs_shape, frame_stack=k, num_envs=c["num_envs"], obs_dtype=dtype,
                       n_step=n, gamma=c["gamma"], seed=c["seed"])
    ref = ReferenceBuffer(slots * c["num_envs"], c["num_envs"], k, n, c["gamma"])
    return buf, ref


# A long stream: many episodes of every start padding, ending both ways, through many wraps of the rings.
LONG = dict(num_envs=3, frame_stack=4, n_step=3, extra_slots=30, vector=False, values=256, p_end=0.05, p_skip=0.3,
            p_restart=0.02, steps=2000, gamma=0.99, seed=1)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
@example(LONG)
def test_every_transition_matches_the_reference(c):
    buf, ref = make_buffers(c)
    rng = np.random.default_rng(c["seed"])
    for t, _ in enumerate(play(buf, ref, rng, c["steps"], c["values"], c["p_end"], c["p_skip"],
                               p_restart=c["p_restart"])):
        expected = ref.valid()
        assert len(buf) == len(ref)
        assert buf.valid_indices().tolist() == sorted(expected)
        if expected and t % 100 == 99:
            assert_matches(buf.get(sorted(expected)), expected)
    if expected:
        assert_matches(buf.get(sorted(expected)), expected)
        assert_matches(buf.sample(64), expected)


@settings(max_examples=40, deadline=None)
@given(configs)
def test_samples_into_preallocated_and_shared_frame_layouts(c):
    buf, ref = make_buffers(c)
    for _ in play(buf, ref, np.random.default_rng(c["seed"]), c["steps"], c["values"], c["p_end"], c["p_skip"],
                  p_restart=c["p_restart"]):
        pass
    expected = ref.valid()
    if not expected:
        with pytest.raises(ValueError):
            buf.sample(8)
        return
    out = buf.empty_batch(16)
    assert buf.sample(16, out=out) is out
    assert_matches(out, expected)
    frames = buf.sample_frames(16)
    obs, next_obs = frames.unpack(buf.frame_stack)
    assert obs.shape == next_obs.shape == (16, *buf.obs_shape)  # as sample gives them, frame_stack 1 too
    for b, index in enumerate(frames.indices):
        want = expected[int(index)]
        np.testing.assert_array_equal(obs[b], want["obs"])
        np.testing.assert_array_equal(next_obs[b], want["next_obs"])
        assert frames.discounts[b] == pytest.approx(want["discount"], rel=1e-6)


def test_sampling_is_uniform_over_valid_transitions():
    buf = ReplayBuffer(60, (4, 2, 2), frame_stack=4, num_envs=2, n_step=3, seed=7)
    ref = ReferenceBuffer(60, 2, 4, 3, 0.99)
    for _ in play(buf, ref, np.random.default_rng(3), 80, p_end=0.15):
        pass
    valid = buf.valid_indices()
    assert 20 < len(valid) < len(buf)  # start frames, the cursor region and open windows are excluded
    draws = np.concatenate([buf.sample(1000).indices for _ in range(200)])
    counts = np.array([np.count_nonzero(draws == i) for i in valid])
    assert counts.sum() == draws.size  # nothing outside the valid set
    expected = draws.size / len(valid)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < len(valid) + 6 * np.sqrt(2 * len(valid))  # ~6 sigma above the chi-square mean


def test_same_seed_same_batches():
    def batches(seed):
        buf = ReplayBuffer(100, (3,), obs_dtype=np.float32, seed=seed)
        for _ in play(buf, ReferenceBuffer(100, 1, 1, 1, 0.99), np.random.default_rng(0), 50):
            pass
        return [buf.sample(10).indices.tolist() for _ in range(3)]

    assert batches(5) == batches(5)
    assert batches(5) != batches(6)


def test_n_step_folding_by_hand():
    """A worked example: gamma 0.5, rewards 1, 2, 4, terminated at the third step."""
    buf = ReplayBuffer(32, (1,), obs_dtype=np.float32, n_step=3, gamma=0.5, seed=0)
    obs = np.zeros((1, 1), np.float32)
    for t, (r, term) in enumerate([(1.0, False), (2.0, False), (4.0, True)]):
        nxt = np.full((1, 1), t + 1, np.float32)
        buf.add(obs, [0], [r], nxt, [term], [False])
        obs = nxt
    batch = buf.get(buf.valid_indices())
    np.testing.assert_allclose(batch.rewards, [1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4])
    np.testing.assert_array_equal(batch.next_obs[:, 0], [3, 3, 3])
    np.testing.assert_array_equal(batch.terminated, [1, 1, 1])
    np.testing.assert_array_equal(batch.discounts, [0, 0, 0])


def test_truncation_bootstraps_from_the_final_observation():
    buf = ReplayBuffer(32, (1,), obs_dtype=np.float32, n_step=2, gamma=0.5, seed=0)
    buf.add(np.zeros((1, 1), np.float32), [0], [1.0], np.ones((1, 1), np.float32), [False], [False])
    buf.add(np.ones((1, 1), np.float32), [1], [1.0], np.full((1, 1), 9, np.float32), [False], [True])
    batch = buf.get(buf.valid_indices())
    np.testing.assert_array_equal(batch.next_obs[:, 0], [9, 9])
    np.testing.assert_array_equal(batch.terminated, [0, 0])
    np.testing.assert_allclose(batch.discounts, [0.25, 0.5])


def test_frame_stack_never_crosses_an_episode_boundary():
    k = 4
    buf = ReplayBuffer(64, (k, 1), frame_stack=k, seed=0)
    frame = lambda v: np.full((1, 1), v, np.uint8)  # noqa: E731
    obs = np.repeat(frame(1), k)[None, :, None]  # envpool-style first observation
    for t in range(2, 5):  # episode A: frames 1, 2, 3, 4, terminated
        nxt = np.concatenate([obs[:, 1:], frame(t)[None]], axis=1)
        buf.add(obs, [0], [0.0], nxt, [t == 4], [False])
        obs = nxt
    obs = np.zeros((1, k, 1), np.uint8)
    obs[0, -1] = 50  # episode B starts zero-padded
    buf.add(obs, [0], [0.0], np.concatenate([obs[:, 1:], frame(51)[None]], axis=1), [False], [False])
    batch = buf.get(buf.valid_indices())
    np.testing.assert_array_equal(batch.obs[:, :, 0], [[1, 1, 1, 1], [1, 1, 1, 2], [1, 1, 2, 3], [0, 0, 0, 50]])
    np.testing.assert_array_equal(batch.next_obs[:, :, 0], [[1, 1, 1, 2], [1, 1, 2, 3], [1, 2, 3, 4], [0, 0, 50, 51]])


@pytest.mark.skipif(bool(os.environ.get("FASTDQN_SANITIZED")), reason="ASan maps shadow memory for every allocation")
def test_memory_is_one_frame_per_transition_and_untouched_until_filled():
    resource = pytest.importorskip("resource")

    def rss_mb():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    before = rss_mb()
    buf = ReplayBuffer(1_000_000, (4, 84, 84), frame_stack=4, num_envs=8, seed=0)
    assert rss_mb() - before < 64  # 7 GB reserved, nothing touched
    bytes_per_transition = sum(v.nbytes for v in buf._core.storage().values()) / buf.capacity
    assert bytes_per_transition <= 7300
    obs = np.zeros((8, 4, 84, 84), np.uint8)
    for _ in range(100):
        buf.add(obs, np.zeros(8, np.int64), np.zeros(8), obs, np.zeros(8, bool), np.zeros(8, bool))
    assert rss_mb() - before < 64


def test_capacity_rounds_down_to_a_multiple_of_num_envs():
    buf = ReplayBuffer(1000, (2,), num_envs=3, obs_dtype=np.float32)
    assert buf.capacity == 999
    assert all(len(view) == 999 for view in buf._core.storage().values())  # the core rounds the same way

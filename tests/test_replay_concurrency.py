"""One thread adds (and ends episodes) while others sample: no torn frame, no stack across episodes."""

import threading
import time

import numpy as np
import pytest

from fastdqn import PrioritizedReplayBuffer, ReplayBuffer

K, FRAME_BYTES, NUM_ENVS, N_STEP, GAMMA = 4, 4096, 2, 3, 0.5


def frame(ids):
    """Frames whose every byte follows from the id in their first four bytes."""
    ids = np.asarray(ids, np.uint32)
    out = ((np.arange(FRAME_BYTES, dtype=np.uint32) * 7 + ids[..., None]) % 251).astype(np.uint8)
    out[..., :4] = ids[..., None].view(np.uint8)
    return out


def check_frames(frames):
    """ids of (..., FRAME_BYTES) frames; fails on any frame that mixes two writes."""
    ids = frames[..., :4].copy().view(np.uint32)[..., 0]
    np.testing.assert_array_equal(frames, frame(ids))
    return ids


def check_stacks(ids):
    steps = np.diff(ids, axis=1)
    assert np.isin(steps, [0, 1]).all(), "a stack skips frames or crosses an episode"
    assert (np.diff(steps, axis=1) >= 0).all(), "padding after the episode's first frame"


def check_batch(batch):
    obs, nxt = check_frames(batch.obs), check_frames(batch.next_obs)
    check_stacks(obs)
    check_stacks(nxt)
    # Every reward is 1: an m-step return is 2 - 2**(1 - m) with gamma 0.5.
    steps = 1 - np.log2(2 - batch.rewards.astype(np.float64))
    m = np.round(steps).astype(np.int64)
    np.testing.assert_allclose(steps, m, atol=1e-6)
    assert ((1 <= m) & (m <= N_STEP)).all()
    np.testing.assert_array_equal(nxt[:, -1], obs[:, -1] + m)  # m frames later, in the same episode
    np.testing.assert_allclose(batch.discounts, np.where(batch.terminated > 0, 0.0, GAMMA ** m))
    np.testing.assert_array_equal(batch.actions, obs[:, -1])  # the adder stores the newest frame id as action


def adder(buf, stop, laps):
    laps.append(0.0)
    counter = np.arange(NUM_ENVS, dtype=np.uint32) << 24
    obs = frame(np.repeat(counter[:, None], K, axis=1))
    rng = np.random.default_rng(0)
    steps = 0
    while not stop.is_set():
        counter += 1
        nxt = np.concatenate([obs[:, 1:], frame(counter)[:, None]], axis=1)
        ended = rng.random(NUM_ENVS) < 0.05
        buf.add(obs, obs[:, -1, :4].copy().view(np.uint32)[:, 0].astype(np.int64), np.ones(NUM_ENVS, np.float32), nxt,
                ended, np.zeros(NUM_ENVS, bool))
        if rng.random() < 0.02:  # every env restarts mid-episode: the buffer ends their episodes
            buf.end_episodes()
            ended[:] = True
        counter[ended] += 1
        restart = frame(np.repeat(counter[:, None], K, axis=1))
        obs = np.where(ended[:, None, None], restart, nxt)
        steps += 1
        laps[0] = steps * NUM_ENVS / buf.capacity


def run(buf, workers, counts, timeout=120.0):
    """Runs until the adder has wrapped the buffer 10 times and each worker made 100 checks."""
    stop, laps, errors = threading.Event(), [], []

    def guard(fn, *args):
        try:
            fn(*args)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)
            stop.set()

    warm = threading.Thread(target=guard, args=(adder, buf, stop, laps))
    warm.start()
    while len(buf) < buf.capacity // 2 and warm.is_alive():
        time.sleep(0.01)
    threads = [threading.Thread(target=guard, args=(w, buf, stop)) for w in workers]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    while not stop.is_set() and time.monotonic() < deadline:
        if laps[0] >= 10 and min(len(c) for c in counts) >= 100:
            break
        time.sleep(0.05)
    stop.set()
    for t in [warm, *threads]:
        t.join()
    if errors:
        raise errors[0]
    assert laps[0] >= 10 and min(len(c) for c in counts) >= 100, "too little work done before the timeout"


def sampler(counts):
    def work(buf, stop):
        out = buf.empty_batch(32)
        while not stop.is_set():
            check_batch(buf.sample(32, out=out))
            counts.append(1)
    return work


def prefetching(counts):
    def work(buf, stop):
        with buf.prefetch(16, depth=3) as pf:
            while not stop.is_set():
                check_batch(pf.next())
                counts.append(1)
    return work


def test_add_while_sampling_never_tears():
    buf = ReplayBuffer(64 * NUM_ENVS, (K, FRAME_BYTES), frame_stack=K, num_envs=NUM_ENVS, n_step=N_STEP, gamma=GAMMA,
                       seed=0)
    plain, prefetched = [], []
    run(buf, [sampler(plain), prefetching(prefetched)], [plain, prefetched])


def test_prioritized_add_sample_and_update_concurrently():
    buf = PrioritizedReplayBuffer(64 * NUM_ENVS, (K, FRAME_BYTES), frame_stack=K, num_envs=NUM_ENVS, n_step=N_STEP,
                                  gamma=GAMMA, seed=0)
    counts, updates = [], []

    def updater(buf, stop):
        rng = np.random.default_rng(1)
        while not stop.is_set():
            batch = buf.sample(32)
            check_batch(batch)
            assert (batch.weights > 0).all() and (batch.weights <= 1).all()
            buf.update_priorities(batch.indices, rng.random(32) * 10)
            updates.append(1)

    run(buf, [sampler(counts), updater], [counts, updates])
    leaves = buf._core.priority_leaves()
    assert buf.priority_total() == pytest.approx(leaves.sum(), rel=1e-9)
    # Only valid transitions carry priority, however the threads interleaved.
    valid = np.zeros(leaves.size, bool)
    for index in buf.valid_indices():
        valid[(index // NUM_ENVS) % (buf.capacity // NUM_ENVS) * NUM_ENVS + index % NUM_ENVS] = True
    np.testing.assert_array_equal(leaves > 0, valid)

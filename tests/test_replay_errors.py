"""Bad input gets a clear error before any state changes."""

import math
import os
import re

import numpy as np
import pytest

from fastdqn import PrioritizedReplayBuffer, ReplayBuffer

K, FRAME = 4, (3, 3)


def make(**kw):
    args = dict(capacity=64, obs_shape=(K, *FRAME), frame_stack=K, num_envs=2, n_step=2, seed=0)
    args.update(kw)
    return ReplayBuffer(**args)


def stack(newest, num_envs=2):
    """Every env's observation whose frames are all value ``f`` for f in newest-K+1..newest, none below 1:
    frame 1 repeated as envpool pads the first observation."""
    values = np.maximum(np.arange(newest - K + 1, newest + 1), 1).astype(np.uint8)
    return np.ascontiguousarray(np.broadcast_to(values[:, None, None], (num_envs, K, *FRAME)))


def step(num_envs=2, value=1):
    """Step `value` of an episode of every env (value 1 starts it); step value+1 continues it."""
    return dict(obs=stack(value, num_envs), actions=np.zeros(num_envs, np.int64),
                rewards=np.ones(num_envs, np.float32), next_obs=stack(value + 1, num_envs),
                terminated=np.zeros(num_envs, bool), truncated=np.zeros(num_envs, bool))


def snapshot(buf):
    storage = {k: v.copy() for k, v in buf._core.storage().items()}
    return len(buf), buf.valid_indices().tolist(), buf._core.state(), storage


def assert_same(a, b):
    assert a[:3] == b[:3]
    for k in a[3]:
        np.testing.assert_array_equal(a[3][k], b[3][k])


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    (dict(capacity=0), ValueError, r"capacity must be >= 28 \(14 slots per env for .*\), got 0$"),
    (dict(capacity=-5), ValueError, r"capacity must be >= 28 \(14 slots per env for .*\), got -5$"),
    (dict(capacity=10), ValueError, r"capacity must be >= 28 \(14 slots per env for frame_stack=4, n_step=2 and "
                                    r"num_envs=2\), got 10$"),
    (dict(capacity=45, num_envs=4), ValueError, r"capacity must be >= 56 \(.*\), got 45, which rounds down to 11 "
                                                r"slots per env \(each env's ring holds capacity // num_envs\)$"),
    (dict(capacity=1.5), TypeError, "capacity"),
    (dict(obs_shape=(3, *FRAME)), ValueError, "obs_shape"),
    (dict(obs_shape=(K,)), ValueError, "obs_shape"),
    (dict(obs_shape="abc"), TypeError, "obs_shape"),
    (dict(obs_shape=(K, 3, 0)), ValueError, r"obs_shape\[2\] must be >= 1, got 0"),
    (dict(obs_shape=(0,), frame_stack=1), ValueError, r"obs_shape\[0\] must be >= 1, got 0"),
    (dict(n_step=0), ValueError, "n_step"),
    (dict(gamma=1.5), ValueError, "gamma"),
    (dict(gamma=-0.1), ValueError, "gamma"),
    (dict(num_envs=0), ValueError, "num_envs"),
    (dict(frame_stack=0), ValueError, "frame_stack"),
    (dict(obs_dtype=object), TypeError, "obs_dtype"),
    (dict(seed=-1), ValueError, "seed"),
])
def test_bad_constructor_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make(**kwargs)


@pytest.mark.parametrize(("field", "value", "error", "match"), [
    ("obs", np.zeros((3, K, *FRAME), np.uint8), ValueError, r"obs must have shape \(2, 4, 3, 3\)"),
    ("obs", np.zeros((2, K, 3, 4), np.uint8), ValueError, "obs must have shape"),
    ("obs", np.zeros((2, K, *FRAME), np.float32), TypeError, "obs must have dtype uint8"),
    ("next_obs", np.zeros((1, K, *FRAME), np.uint8), ValueError, "next_obs must have shape"),
    ("actions", np.zeros(3, np.int64), ValueError, r"actions must have shape \(2,\)"),
    ("actions", np.zeros(2, np.float32), TypeError, "actions"),
    ("rewards", np.zeros((2, 1)), ValueError, "rewards"),
    ("rewards", np.array(["a", "b"]), TypeError, "rewards"),
    ("rewards", np.array([0.0, np.nan]), ValueError, "rewards"),
    ("terminated", np.zeros(2, np.float32), TypeError, "terminated"),
    ("truncated", np.zeros(1, bool), ValueError, "truncated"),
])
def test_bad_add_leaves_the_buffer_unchanged(field, value, error, match):
    buf = make()
    buf.add(**step())
    before = snapshot(buf)
    with pytest.raises(error, match=match):
        buf.add(**{**step(value=2), field: value})
    assert_same(before, snapshot(buf))


def test_a_row_that_does_not_continue_its_episode_is_rejected_atomically():
    buf = make()
    buf.add(**step())
    before = snapshot(buf)
    bad = step(value=2)  # row 0 continues, row 1 does not: its newest frame is not the last one added
    bad["obs"][1, -1] = 7
    with pytest.raises(ValueError, match=r"obs\[1\] does not continue env 1's episode"):
        buf.add(**bad)
    assert_same(before, snapshot(buf))


FIRST_OBSERVATIONS = {  # an episode's first frames (values), padded each way the buffer rebuilds
    "repeats": [5, 5, 5, 5],
    "zeros": [0, 0, 0, 5],
    "some repeats": [5, 5, 6, 7],
    "none": [4, 5, 6, 7],
}


def frames(values):
    return np.asarray(values, np.uint8)[:, None, None] * np.ones(FRAME, np.uint8)


@pytest.mark.parametrize("padding", FIRST_OBSERVATIONS)
@pytest.mark.parametrize("frame", range(K))
@pytest.mark.parametrize("added", [1, 2, K + 1])  # steps before: start padding still in the stack, or long gone
def test_obs_must_continue_the_episode_in_every_frame(padding, frame, added):
    """The whole stack is compared, padding included, not only its newest frame."""
    buf = make()
    values = FIRST_OBSERVATIONS[padding] + list(range(100, 100 + added + 1))  # frame values as the episode goes on
    history = [np.stack([frames(values[t:t + K])] * 2) for t in range(added + 2)]  # both envs' obs at step t
    for t in range(added):
        buf.add(**{**step(), "obs": history[t], "next_obs": history[t + 1]})
    before = snapshot(buf)
    obs, nxt = history[added].copy(), history[added + 1].copy()
    obs[0, frame] += 1  # row 0 is env 1: the message names the row, then the env
    if frame > 0:
        nxt[0, frame - 1] += 1  # next_obs still follows obs: only the continuation is wrong
    with pytest.raises(ValueError, match=rf"obs\[0\] does not continue env 1's episode: it differs from the previous "
                                         rf"next_obs \(in frame {frame} of {K}\)"):
        buf.add(**{**step(), "obs": obs, "next_obs": nxt}, env_ids=[1, 0])
    assert_same(before, snapshot(buf))
    buf.add(**{**step(), "obs": history[added], "next_obs": history[added + 1]}, env_ids=[1, 0])  # the true step
    assert len(buf) == before[0] + 2


@pytest.mark.parametrize("frame", range(K - 1))
@pytest.mark.parametrize("episode_open", [False, True])
def test_next_obs_must_be_obs_one_frame_on(frame, episode_open):
    buf = make()
    if episode_open:
        buf.add(**step())
    before = snapshot(buf)
    bad = step(value=2 if episode_open else 1)  # row 0 is fine, row 1's next_obs skips or repeats a frame
    bad["next_obs"][1, frame] += 1
    with pytest.raises(ValueError, match=rf"next_obs\[1\] does not follow obs\[1\]: with frame_stack {K}, "
                                         rf"next_obs's oldest {K - 1} frames must be obs's newest {K - 1}"):
        buf.add(**bad)
    assert_same(before, snapshot(buf))


def test_the_stacks_of_the_issue_are_refused():
    """The review's example: each next_obs all ones more than obs, not obs one frame on."""
    buf = ReplayBuffer(1000, (4, 2, 2), frame_stack=4, seed=0)
    obs = np.zeros((1, 4, 2, 2), np.uint8)
    with pytest.raises(ValueError, match=r"next_obs\[0\] does not follow obs\[0\]"):
        buf.add(obs, np.zeros(1, np.int64), np.ones(1, np.float32), obs + 1, np.zeros(1, bool), np.zeros(1, bool))
    assert len(buf) == 0


@pytest.mark.parametrize(("env_ids", "error", "match"), [
    ([0, 0], ValueError, "twice"),
    ([0, 2], ValueError, "env_ids"),
    ([-1, 0], ValueError, "env_ids"),
    ([0.0, 1.0], TypeError, "env_ids"),
])
def test_bad_env_ids(env_ids, error, match):
    buf = make()
    before = snapshot(buf)
    with pytest.raises(error, match=match):
        buf.add(**step(), env_ids=np.array(env_ids))
    assert_same(before, snapshot(buf))


@pytest.mark.parametrize(("env_ids", "error"), [
    ([0, 2], ValueError), ([-1], ValueError), ([0.0], TypeError), ([[0, 1]], TypeError)])
def test_bad_env_ids_to_end_episodes(env_ids, error):
    buf = make()
    buf.add(**step())  # both envs' episodes open
    before = snapshot(buf)
    with pytest.raises(error, match="env_ids"):
        buf.end_episodes(np.array(env_ids))
    assert_same(before, snapshot(buf))
    with pytest.raises(ValueError, match="env_ids"):  # past the Python checks, the core's own
        buf._core.end_episodes(np.array([0, 5], np.int64))
    with pytest.raises(TypeError, match="env_ids must be a numpy array"):
        buf._core.end_episodes([0])
    assert_same(before, snapshot(buf))
    buf.add(**step(value=2))  # the episodes still go on


def test_no_env_ids_end_no_episodes():
    buf = make()
    buf.add(**step())
    before = snapshot(buf)
    buf.end_episodes([])  # numpy makes [] a float array; it is accepted as no ids
    assert_same(before, snapshot(buf))


def test_sampling_errors():
    buf = make()
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4)
    buf.add(**step())
    with pytest.raises(ValueError, match="n-step window"):
        buf.sample(4)  # two transitions held, neither window complete
    buf.add(**{**step(value=2), "terminated": np.ones(2, bool)})
    for bad, error in [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError)]:
        with pytest.raises(error, match="batch_size"):
            buf.sample(bad)
    out = buf.empty_batch(4)
    out.obs = np.zeros((4, K, *FRAME), np.float32)
    with pytest.raises(TypeError, match="out.obs"):
        buf.sample(4, out=out)
    for rows in (4, 16):
        with pytest.raises(ValueError, match=re.escape(f"out.obs must have shape {(8, K, *FRAME)} (batch_size=8 rows), "
                                                       f"got {(rows, K, *FRAME)}")):
            buf.sample(8, out=buf.empty_batch(rows))
    # A uniform buffer's importance weights are all 1: an out.weights (a batch made for either kind) gets ones.
    out = buf.empty_batch(8)
    out.weights = np.zeros(8, np.float32)
    assert buf.sample(8, out=out).weights.tolist() == [1.0] * 8
    with buf.prefetch(8, out=[out]) as batches:
        out.weights[:] = 0  # filled once, when the prefetcher takes the batch
        assert batches.next().weights.tolist() == [0.0] * 8
    out.weights[:] = 0
    with pytest.raises(ValueError, match="cannot sample from an empty buffer|out's batches must not share memory"):
        buf.prefetch(8, out=[out, out])
    assert out.weights.tolist() == [0.0] * 8  # a refused call changes nothing
    out.weights = np.zeros(8, np.float64)
    with pytest.raises(TypeError, match="out.weights must be a numpy array of dtype float32, got float64"):
        buf.sample(8, out=out)
    out.weights = np.zeros(8, np.float32)
    out.weights.flags.writeable = False
    before = out.indices.copy()
    for refused in (lambda: buf.sample(8, out=out), lambda: buf.prefetch(8, out=[out])):
        with pytest.raises(ValueError, match="out.weights is read-only: sampling writes into it"):
            refused()
        np.testing.assert_array_equal(out.indices, before)  # refused before anything was sampled into it


def test_prioritized_errors_change_nothing():
    buf = PrioritizedReplayBuffer(64, (K, *FRAME), frame_stack=K, num_envs=2, seed=0)
    for v in range(1, 5):
        buf.add(**step(value=v))
    batch = buf.sample(4)
    total = buf.priority_total()
    for indices, priorities, error in [
        (batch.indices, [1.0, -1.0, 1.0, 1.0], ValueError),
        (batch.indices, [1.0, np.nan, 1.0, 1.0], ValueError),
        (batch.indices, [1.0, np.inf, 1.0, 1.0], ValueError),
        ([*batch.indices[:3], 10**9], [1.0] * 4, ValueError),
        ([-1, *batch.indices[1:]], [1.0] * 4, ValueError),
        (batch.indices, [1.0] * 3, ValueError),
        (batch.indices.astype(float), [1.0] * 4, TypeError),
    ]:
        with pytest.raises(error):
            buf.update_priorities(np.asarray(indices), np.asarray(priorities))
        assert buf.priority_total() == total
    for kwargs in [dict(alpha=-1), dict(eps=0), dict(beta=-0.5)]:
        with pytest.raises(ValueError):
            PrioritizedReplayBuffer(64, (K, *FRAME), frame_stack=K, **kwargs)
    for name in ("alpha", "eps", "beta"):  # refused as Python, not later (or wrongly) by the core
        for value in (math.inf, math.nan):
            with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0, got {value}"):
                PrioritizedReplayBuffer(64, (K, *FRAME), frame_stack=K, **{name: value})
    for value in (-1, math.inf, math.nan):
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            buf.sample(4, beta=value)
        with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
            buf.beta = value
    assert buf.beta == 0.4
    with pytest.raises(ValueError, match="negative"):
        buf.sampling_mass([-1])
    assert buf.sampling_mass([10**9]).tolist() == [0.0]  # never added: no mass


@pytest.mark.parametrize(("action_dtype", "actions", "bounds"), [
    (np.uint8, [0, 300], "[0, 255]"),
    (np.uint8, [-1, 0], "[0, 255]"),
    (np.int8, [0, 128], "[-128, 127]"),
    (np.int8, [-129, 0], "[-128, 127]"),
    (np.uint64, [-1, 0], f"[0, {2**64 - 1}]"),
    (np.int64, np.array([0, 2**63], np.uint64), f"[{-2**63}, {2**63 - 1}]"),
    (np.bool_, [0, 2], "[0, 1]"),
])
def test_actions_that_do_not_fit_the_action_dtype(action_dtype, actions, bounds):
    buf = make(action_dtype=action_dtype)
    buf.add(**step())
    before = snapshot(buf)
    dtype = np.dtype(action_dtype)
    with pytest.raises(ValueError, match=rf"actions must be in {re.escape(bounds)} to fit {dtype}"):
        buf.add(**{**step(value=2), "actions": np.asarray(actions)})
    assert_same(before, snapshot(buf))


@pytest.mark.parametrize(("action_dtype", "actions"), [
    (np.uint8, [0, 255]), (np.int8, [-128, 127]), (np.uint64, np.array([0, 2**64 - 1], np.uint64)),
    (np.int64, np.array([0, 2**63 - 1], np.uint64)), (np.bool_, [1, 0]), (np.float32, [-7, 300])])
def test_actions_at_the_ends_of_the_action_dtype_are_stored_exactly(action_dtype, actions):
    buf = make(action_dtype=action_dtype)
    buf.add(**{**step(), "actions": np.asarray(actions), "terminated": np.ones(2, bool)})
    stored = buf.get(buf.valid_indices()).actions
    assert stored.dtype == np.dtype(action_dtype) and stored.tolist() == np.asarray(actions).tolist()


@pytest.mark.parametrize("field", ["terminated", "truncated"])
def test_integer_flags_must_be_0_or_1(field):
    buf = make()
    buf.add(**step())
    before = snapshot(buf)
    with pytest.raises(ValueError, match=rf"{field} must be in \[0, 1\] to fit bool, got values from 0 to 2"):
        buf.add(**{**step(value=2), field: np.array([0, 2])})
    assert_same(before, snapshot(buf))
    buf.add(**{**step(value=2), field: np.array([0, 1])})  # 0 and 1 are the flags they say
    assert buf._core.state()["episode_open"] == [True, False]


@pytest.mark.parametrize("kind", [ReplayBuffer, PrioritizedReplayBuffer])
def test_settings_are_fixed_at_construction_and_saved_as_made(kind, tmp_path):
    """The core holds them and save writes them: an assignment raises rather than being ignored
    by one and written by the other."""
    buf = kind(64, (K, *FRAME), frame_stack=K, num_envs=2, n_step=2, gamma=0.9, seed=3)
    for name, value in [("gamma", 0.5), ("n_step", 3), ("capacity", 128), ("seed", 4), ("frame_stack", 1),
                        ("num_envs", 1), ("obs_shape", (2,)), ("frame_shape", (2,)), ("obs_dtype", np.float32),
                        ("action_dtype", np.int32)]:
        with pytest.raises(AttributeError, match=f"{name} is fixed at construction"):
            setattr(buf, name, value)
    buf.add(**step())
    buf.add(**{**step(value=2), "terminated": np.ones(2, bool)})
    buf.save(tmp_path / "buf.fdqn")
    loaded = kind.load(tmp_path / "buf.fdqn")
    assert (loaded.gamma, loaded.n_step, loaded.seed) == (0.9, 2, 3)
    np.testing.assert_array_equal(loaded.get(loaded.valid_indices()).discounts,
                                  buf.get(buf.valid_indices()).discounts)


def test_indices_must_be_integers():
    buf = PrioritizedReplayBuffer(64, (K, *FRAME), frame_stack=K, num_envs=2, seed=0)
    buf.add(**step())
    buf.add(**{**step(value=2), "terminated": np.ones(2, bool)})
    index = int(buf.valid_indices()[0])
    for read in (buf.get, buf.sampling_mass):
        with pytest.raises(TypeError, match="indices must be integers, got dtype float64"):
            read([index + 0.7])  # would have read index
    assert buf.get([index]).indices.tolist() == [index] and buf.sampling_mass([index]).shape == (1,)
    assert buf.get([]).indices.size == 0


def test_misuse_of_batches_prefetchers_and_copies_is_refused(tmp_path):
    import copy
    import pickle

    buf = make()
    buf.add(**step())
    buf.add(**{**step(value=2), "terminated": np.ones(2, bool)})
    frames = buf.sample_frames(4)
    past_the_frames = K + buf.n_step + 1 - int(frames.next_offset.max())  # a next observation would end past them
    for wrong in (K + buf.n_step, past_the_frames, 0):
        with pytest.raises(ValueError, match="frame_stack"):
            frames.unpack(wrong)
    batch = buf.empty_batch(4)
    with pytest.raises(ValueError, match="out's batches must not share memory"):
        buf.prefetch(4, out=[batch, batch])
    with pytest.raises(ValueError, match=r"depth is len\(out\) when out is given: got depth=3 and 1 batches"):
        buf.prefetch(4, depth=3, out=[batch])
    with pytest.raises(TypeError, match="depth must be an int, got bool"):
        buf.prefetch(4, depth=True, out=[batch])
    with buf.prefetch(4, depth=1, out=[batch]) as agreeing:
        assert agreeing.next() is not None
    prefetcher = buf.prefetch(4)
    prefetcher.next()
    prefetcher.close()
    assert list(prefetcher) == []  # a closed prefetcher ends its iteration
    for duplicate in (copy.copy, copy.deepcopy, pickle.dumps):
        with pytest.raises(TypeError, match="cannot be copied or pickled: save\\(\\) it and load\\(\\) the file"):
            duplicate(buf)


def test_priorities_whose_sum_could_overflow_are_refused_and_empty_updates_are_fine():
    buf = PrioritizedReplayBuffer(64, (K, *FRAME), frame_stack=K, num_envs=2, alpha=1.0, seed=0)
    buf.add(**step())
    buf.add(**{**step(value=2), "terminated": np.ones(2, bool)})
    indices = buf.valid_indices()
    total = buf.priority_total()
    with pytest.raises(ValueError, match=r"priorities must be at most 2\.\d+e\+306"):
        buf.update_priorities(indices, np.full(indices.size, 1e308))
    assert buf.priority_total() == total
    buf.update_priorities([], [])
    buf.update_priorities(indices, np.full(indices.size, 1e300))
    assert np.isfinite(buf.sample(8).weights).all()


def test_a_bad_buffer_file_is_named_in_the_error(tmp_path):
    from fastdqn.replay_file import ReplayFileError

    path = tmp_path / "cut.fdqn"
    buf = make()
    buf.add(**step())
    buf.save(path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ReplayFileError, match=re.escape(str(path)) + ": "):
        ReplayBuffer.load(path)


@pytest.mark.skipif(bool(os.environ.get("FASTDQN_SANITIZED")), reason="ASan aborts on an allocation this large")
def test_a_buffer_too_large_to_reserve_says_how_large():
    with pytest.raises(MemoryError, match=r"capacity 10,000,000,000,000 with 7,056-byte frames needs 70560000\.0 GB"):
        ReplayBuffer(10**13, (4, 84, 84), frame_stack=4)


class ArrayScalar:
    """A 0-d array of another library (a JAX or torch scalar), seen through ``__array__``."""

    def __init__(self, value):
        self.value = value

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.value, dtype)


def test_integer_and_real_arguments_may_be_other_libraries_scalars():
    buf = make(capacity=ArrayScalar(np.int64(64)), n_step=ArrayScalar(np.int32(2)))
    assert (buf.capacity, buf.n_step) == (64, 2) and type(buf.n_step) is int
    buf.add(**step())
    buf.add(**{**step(value=2), "terminated": np.ones(2, bool)})
    assert len(buf.sample(ArrayScalar(np.int32(3))).indices) == 3
    for wrong in (ArrayScalar(3.0), ArrayScalar(np.array([3])), ArrayScalar(True)):
        with pytest.raises(TypeError, match="batch_size must be an int, got ArrayScalar"):
            buf.sample(wrong)
    assert len(buf.sample(np.array(5)).indices) == 5  # numpy's own 0-d arrays too
    class Unreadable(ArrayScalar):  # as a torch tensor that requires grad
        def __array__(self, dtype=None, copy=None):
            raise RuntimeError("Can't call numpy() on Tensor that requires grad")

    with pytest.raises(TypeError, match="batch_size must be an int, got Unreadable"):
        buf.sample(Unreadable(5))  # numpy cannot read it: the argument's error, not numpy's
    with pytest.raises(ValueError, match="capacity must be a 64-bit integer, got -1000000000000000000000000000000"):
        make(capacity=-10**30)
    per = PrioritizedReplayBuffer(64, (K, *FRAME), frame_stack=K, num_envs=2, seed=0, alpha=ArrayScalar(np.float32(0.5)))
    per.add(**step())
    per.add(**{**step(value=2), "terminated": np.ones(2, bool)})
    assert per.alpha == 0.5
    per.beta = ArrayScalar(np.float64(0.25))
    assert per.beta == 0.25 and len(per.sample(4, beta=ArrayScalar(np.float32(1.0))).weights) == 4

"""fastdqn.envs: shapes, auto-reset, termination vs truncation, Atari protocols, errors.

Expectations come from outside the module under test: plain gymnasium envs stepped in lockstep,
CartPole's dynamics, raw envpool configured by hand from the protocol's definition, and envpool's
Atari preprocessing as the reference for the gymnasium fallback.
"""

import dataclasses
import importlib.util
import re
from pathlib import Path

import envpool
import gymnasium as gym
import numpy as np
import pytest

from fastdqn.envs import ATARI_PROTOCOLS, AtariProtocol, make_env

# The cleanrl protocol with no random no-op starts: envpool and the gymnasium fallback then play the same
# deterministic game for the same actions (their no-op counts come from different random generators).
DETERMINISTIC_CLEANRL = dataclasses.replace(ATARI_PROTOCOLS["cleanrl"], noop_max=1)


def cartpole_dynamics(obs, action):
    """CartPole-v1's next state and termination from `obs`, by gymnasium's own implementation."""
    ref = gym.make("CartPole-v1").unwrapped
    ref.reset(seed=0)
    ref.state = np.asarray(obs, np.float64)
    next_obs, _, terminated, _, _ = ref.step(int(action))
    return next_obs, terminated


@pytest.mark.parametrize(
    "env_id, backend, expected_backend, obs_shape, obs_dtype, num_actions, frame_stack",
    [
        ("CartPole-v1", "auto", "envpool", (4,), np.float32, 2, 1),
        ("CartPole-v1", "gymnasium", "gymnasium", (4,), np.float32, 2, 1),
        ("Acrobot-v1", "gymnasium", "gymnasium", (6,), np.float32, 3, 1),
        ("Pong-v5", "auto", "envpool", (4, 84, 84), np.uint8, 6, 4),
        ("Breakout-v5", "auto", "envpool", (4, 84, 84), np.uint8, 4, 4),
        ("ALE/Breakout-v5", "auto", "gymnasium", (4, 84, 84), np.uint8, 4, 4),
    ],
)
def test_shapes_and_dtypes(env_id, backend, expected_backend, obs_shape, obs_dtype, num_actions, frame_stack):
    with make_env(env_id, num_envs=3, seed=0, backend=backend) as env:
        assert env.backend == expected_backend
        assert (env.env_id, env.num_envs, env.mode) == (env_id, 3, "train")
        assert env.obs_shape == obs_shape and env.obs_dtype == np.dtype(obs_dtype)
        assert env.num_actions == num_actions and env.frame_stack == frame_stack
        assert env.is_image == (len(obs_shape) == 3)
        assert env.protocol == ("cleanrl" if frame_stack == 4 else None)
        obs = env.reset()
        assert obs.shape == (3, *obs_shape) and obs.dtype == obs_dtype
        res = env.step(np.zeros(3, np.int64))
        assert res.obs.shape == res.next_obs.shape == (3, *obs_shape) and res.obs.dtype == obs_dtype
        assert res.rewards.dtype == np.float32 and res.rewards.shape == (3,)
        for flags in (res.terminated, res.truncated, res.valid):
            assert flags.dtype == np.bool_ and flags.shape == (3,)
        assert res.valid.all()
        np.testing.assert_array_equal(res.env_ids, np.arange(3))
        assert res.episode_returns.shape == res.episode_lengths.shape == (0,)


def test_envpool_cartpole_stores_final_obs_and_skips_reset_rows():
    # Env 0 always pushes left, env 1 always right: both poles fall within a few dozen steps, repeatedly.
    actions = np.array([0, 1])
    with make_env("CartPole-v1", num_envs=2, seed=1) as env:
        assert env.backend == "envpool"
        obs = env.reset()
        counted = np.zeros(2, int)
        ended = np.zeros(2, bool)
        episodes = 0
        for _ in range(120):
            res = env.step(actions)
            np.testing.assert_array_equal(res.valid, ~ended)  # exactly the row after an episode end only resets
            for i in range(2):
                if res.valid[i]:
                    expected, terminated = cartpole_dynamics(obs[i], actions[i])
                    np.testing.assert_allclose(res.next_obs[i], expected, atol=1e-5)
                    assert res.terminated[i] == terminated and not res.truncated[i]
                    assert res.rewards[i] == 1.0
                    counted[i] += 1
                else:
                    assert np.all(np.abs(res.obs[i]) <= 0.05)  # CartPole's reset distribution
                    assert res.rewards[i] == 0 and not res.terminated[i] and not res.truncated[i]
            ended = res.terminated | res.truncated
            finished = np.flatnonzero(ended)
            np.testing.assert_array_equal(res.episode_lengths, counted[finished])
            np.testing.assert_array_equal(res.episode_returns, counted[finished].astype(float))
            episodes += len(finished)
            counted[finished] = 0
            obs = res.obs
        assert episodes >= 6


def test_gymnasium_backend_matches_single_envs_in_lockstep():
    n, seed = 3, 7
    refs = [gym.make("CartPole-v1") for _ in range(n)]
    ref_obs = [ref.reset(seed=seed + i)[0] for i, ref in enumerate(refs)]
    rng = np.random.default_rng(0)
    with make_env("CartPole-v1", num_envs=n, seed=seed, backend="gymnasium") as env:
        np.testing.assert_array_equal(env.reset(), np.stack(ref_obs))
        ref_done = np.zeros(n, bool)
        ret, length = np.zeros(n), np.zeros(n, int)
        episodes = 0
        for _ in range(300):
            actions = rng.integers(2, size=n)
            res = env.step(actions)
            finished_returns, finished_lengths = [], []
            for i, ref in enumerate(refs):
                if ref_done[i]:
                    expected_obs, _ = ref.reset()
                    assert not res.valid[i] and res.rewards[i] == 0
                    np.testing.assert_array_equal(res.obs[i], expected_obs)
                    ref_done[i] = False
                    continue
                expected_obs, reward, terminated, truncated, _ = ref.step(int(actions[i]))
                assert res.valid[i]
                np.testing.assert_array_equal(res.next_obs[i], expected_obs)
                assert (res.rewards[i], res.terminated[i], res.truncated[i]) == (reward, terminated, truncated)
                ret[i] += reward
                length[i] += 1
                if terminated or truncated:
                    ref_done[i] = True
                    finished_returns.append(ret[i])
                    finished_lengths.append(length[i])
                    ret[i], length[i] = 0, 0
            np.testing.assert_array_equal(res.episode_returns, finished_returns)
            np.testing.assert_array_equal(res.episode_lengths, finished_lengths)
            episodes += len(finished_lengths)
        assert episodes >= 10


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_time_limit_is_truncation(backend):
    with make_env("CartPole-v1", num_envs=1, seed=0, backend=backend, max_episode_steps=5) as env:
        env.reset()
        for episode in range(2):
            for t in range(1, 6):
                res = env.step(np.array([t % 2]))  # alternate pushes: the pole stays up for 5 steps
                assert res.valid[0] and not res.terminated[0]
                assert res.truncated[0] == (t == 5)
            np.testing.assert_array_equal(res.episode_lengths, [5])
            np.testing.assert_array_equal(res.episode_returns, [5.0])
            res = env.step(np.array([0]))
            assert not res.valid[0] and not res.truncated[0] and len(res.episode_lengths) == 0


@pytest.mark.parametrize("env_id", ["Pong-v5", "ALE/Pong-v5"])
def test_atari_time_limit_is_truncation(env_id):
    with make_env(env_id, num_envs=1, seed=0, max_episode_steps=30) as env:
        env.reset()
        for t in range(1, 31):
            res = env.step(np.array([0]))
            assert not res.terminated[0] and res.truncated[0] == (t == 30)  # no Pong game ends in 30 steps
        np.testing.assert_array_equal(res.episode_lengths, [30])
        assert not env.step(np.array([0])).valid[0]


@pytest.mark.parametrize("game", ["Breakout", "SpaceInvaders"])
def test_gymnasium_atari_fallback_matches_envpool(game):
    """Same game, same actions: same observations (up to rounding), rewards, ends and returns."""
    rng = np.random.default_rng(0)
    with make_env(f"{game}-v5", 1, 0, protocol=DETERMINISTIC_CLEANRL) as ep, \
            make_env(f"ALE/{game}-v5", 1, 0, protocol=DETERMINISTIC_CLEANRL) as gy:
        assert (ep.backend, gy.backend) == ("envpool", "gymnasium")
        assert ep.num_actions == gy.num_actions
        np.testing.assert_allclose(ep.reset(), gy.reset(), atol=1)
        terminations = 0
        for _ in range(2000):
            actions = rng.integers(ep.num_actions, size=1)
            a, b = ep.step(actions), gy.step(actions)
            for field in ("rewards", "terminated", "truncated", "valid", "episode_returns", "episode_lengths"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
            if len(a.episode_returns):
                break  # envpool's last frame of a game can be a stale one: not compared
            np.testing.assert_allclose(a.obs, b.obs, atol=1)  # OpenCV vs numpy area resize rounding
            terminations += a.terminated.sum()
        else:
            pytest.fail("no game ended")
        assert terminations >= 2  # life losses ended training episodes before the game ended


@pytest.mark.parametrize("env_id", ["Breakout-v5", "ALE/Breakout-v5"])
def test_frame_stack_shifts_and_restarts_at_every_episode_start(env_id):
    rng = np.random.default_rng(1)
    with make_env(env_id, 2, 0) as env:
        obs = env.reset()
        restarts = 0
        for _ in range(150):
            res = env.step(rng.integers(env.num_actions, size=2))
            for i in range(2):
                if res.valid[i]:
                    np.testing.assert_array_equal(res.next_obs[i, :3], obs[i, 1:])
                else:  # after a life loss too: no frame from before it
                    assert all(np.array_equal(res.obs[i, k], res.obs[i, 3]) for k in range(3))
                    restarts += 1
            obs = res.obs
        assert restarts >= 4


def raw_envpool(game, seed, episodic_life):
    """envpool configured by hand from CleanRL's dqn_atari settings, with raw rewards."""
    return envpool.make_gymnasium(
        game, num_envs=1, seed=seed, episodic_life=episodic_life, reward_clip=False, noop_max=30,
        use_fire_reset=True, repeat_action_probability=0.0, frame_skip=4, max_episode_steps=27000,
    )


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_episodic_life_and_reward_clipping_against_raw_envpool(mode):
    rng = np.random.default_rng(2)
    ref = raw_envpool("SpaceInvaders-v5", 3, episodic_life=True)  # in both modes, as CleanRL
    with make_env("SpaceInvaders-v5", 1, seed=3, mode=mode) as env:
        _, info = ref.reset()
        env.reset()
        lives, game_return, terminations, largest_raw = info["lives"][0], 0.0, 0, 0.0
        start_lives = lives
        for _ in range(5000):
            actions = rng.integers(env.num_actions, size=1)
            res = env.step(actions)
            _, reward, terminated, truncated, info = ref.step(actions)
            raw = info["reward"][0]
            largest_raw = max(largest_raw, raw)
            expected_reward = np.sign(raw) if mode == "train" else raw
            assert res.rewards[0] == expected_reward
            game_over = bool(info["terminated"][0])
            life_lost = info["lives"][0] < lives
            assert res.terminated[0] == (game_over or life_lost)
            assert not res.truncated[0]
            lives = info["lives"][0]
            terminations += res.terminated[0]
            game_return += raw
            if game_over:
                np.testing.assert_array_equal(res.episode_returns, [game_return])  # the whole game, unclipped
                np.testing.assert_array_equal(res.episode_lengths, info["elapsed_step"])
                break
            assert len(res.episode_returns) == 0
        else:
            pytest.fail("no game ended")
    ref.close()
    assert largest_raw > 1  # clipping was exercised
    assert terminations == start_lives  # one per life: the game's last is its end


def test_envpool_observations_are_not_overwritten():
    with make_env("Pong-v5", 2, 0) as env:
        held = [env.reset()]
        for t in range(60):
            held.append(env.step(np.full(2, t % 6)).obs)
        copies = [h.copy() for h in held]
        for t in range(60):
            env.step(np.full(2, t % 6))
        assert all(np.array_equal(h, c) for h, c in zip(held, copies))


def test_envpool_async_batches():
    num_envs, batch = 4, 2
    with make_env("CartPole-v1", num_envs, seed=0, batch_size=batch) as env:
        assert env.batch_size == batch
        with pytest.raises(RuntimeError, match="async"):
            env.reset()
        env.async_reset()
        last_obs = [None] * num_envs
        last_action = np.zeros(num_envs, int)
        ended = np.ones(num_envs, bool)  # every env's first row is its reset
        counted = np.zeros(num_envs, int)
        seen = np.zeros(num_envs, int)
        episodes = 0
        for step in range(400):
            res = env.recv()
            ids = res.env_ids
            assert len(ids) == batch and len(set(ids.tolist())) == batch
            np.testing.assert_array_equal(res.valid, ~ended[ids])
            for row, i in enumerate(ids):
                if res.valid[row]:
                    expected, terminated = cartpole_dynamics(last_obs[i], last_action[i])
                    np.testing.assert_allclose(res.next_obs[row], expected, atol=1e-5)
                    assert res.terminated[row] == terminated
                    counted[i] += 1
                seen[i] += 1
                last_obs[i] = res.obs[row]
            done = res.terminated | res.truncated
            ended[ids] = done
            np.testing.assert_array_equal(res.episode_lengths, counted[ids[done]])
            episodes += done.sum()
            counted[ids[done]] = 0
            actions = (step // 3 + ids) % 2
            last_action[ids] = actions
            env.send(actions, ids)
        env.recv()  # collect the batch in flight before closing
        assert episodes >= 4 and (seen > 50).all()


@pytest.mark.parametrize("env_id, num_envs, batch, max_steps", [("CartPole-v1", 4, 4, 40), ("CartPole-v1", 4, 2, 40),
                                                                 ("Breakout-v5", 2, 2, 60), ("Breakout-v5", 4, 2, 60)])
def test_envpool_steps_match_envpools_public_api(env_id, num_envs, batch, max_steps):
    """fastdqn reads envpool's core arrays directly (skipping its Python wrapper); an env forced
    onto envpool's public send/recv gives the same steps: episode ends, time limits, life losses.
    In async mode envs come back in any order, so each env's own stream of rows is compared."""

    def play(env) -> dict[int, list]:
        rows = {i: [] for i in range(num_envs)}
        env.async_reset()
        for _ in range(150):
            res = env.recv()
            for row, i in enumerate(res.env_ids.tolist()):
                ended = res.episode_env_ids == i
                rows[i].append((res.obs[row], res.next_obs[row], res.rewards[row], res.terminated[row],
                                res.truncated[row], res.valid[row], res.episode_returns[ended],
                                res.episode_lengths[ended]))
            actions = [(len(rows[i]) * 7 + i) % env.num_actions for i in res.env_ids.tolist()]
            env.send(np.array(actions), res.env_ids)
        env.recv()
        return rows

    with make_env(env_id, num_envs, seed=3, batch_size=batch, max_episode_steps=max_steps) as direct:
        assert direct._layout is not None
        expected = play(direct)
    with make_env(env_id, num_envs, seed=3, batch_size=batch, max_episode_steps=max_steps) as public:
        public._layout = None
        got = play(public)
    ends = 0
    for i in range(num_envs):
        steps = min(len(expected[i]), len(got[i]))
        assert steps >= 30
        for t, (a, b) in enumerate(zip(expected[i][:steps], got[i][:steps])):
            for field, x, y in zip(["obs", "next_obs", "reward", "terminated", "truncated", "valid", "returns",
                                    "lengths"], a, b):
                np.testing.assert_array_equal(x, y, err_msg=f"env {i}, row {t}: {field}")
            ends += int(a[3] or a[4])
    assert ends >= 4


def test_send_copies_the_actions():
    """envpool's workers read the actions after send returns: a caller reusing its array at once
    (int32, envpool's own action dtype, so no conversion copies it) must not change the steps."""
    trajectories = []
    for reuse in (False, True):
        with make_env("CartPole-v1", 8, seed=1) as env:
            env.reset()
            rng = np.random.default_rng(0)
            observations = []
            for _ in range(300):
                actions = rng.integers(2, size=8).astype(np.int32)
                env.send(actions)
                if reuse:
                    actions[:] = 1 - actions
                observations.append(env.recv().obs)
            trajectories.append(np.stack(observations))
    np.testing.assert_array_equal(trajectories[1], trajectories[0])


def test_gymnasium_backend_supports_send_recv():
    with make_env("CartPole-v1", 2, seed=5, backend="gymnasium") as env:
        env.async_reset()
        first = env.recv()
        assert not first.valid.any() and (np.abs(first.obs) <= 0.05).all()
        env.send(np.array([0, 1]))
        res = env.recv()
        assert res.valid.all()
        for i in range(2):
            np.testing.assert_allclose(res.next_obs[i], cartpole_dynamics(first.obs[i], i)[0], atol=1e-6)
        with pytest.raises(ValueError, match="env_ids"):
            env.send(np.array([0]), np.array([1]))


@pytest.mark.parametrize(
    "protocol, mode, expected",
    [
        ("cleanrl", "train", dict(noop_max=30, repeat_action_probability=0.0, episodic_life=True, use_fire_reset=True)),
        ("cleanrl", "eval", dict(noop_max=30, repeat_action_probability=0.0, episodic_life=True, use_fire_reset=True)),
        ("machado", "train", dict(noop_max=1, repeat_action_probability=0.25, episodic_life=False, use_fire_reset=False)),
    ],
)
def test_protocols_configure_envpool(protocol, mode, expected):
    with make_env("Breakout-v5", 1, protocol=protocol, mode=mode) as env:
        config = env._pool.config
        for key, value in expected.items():
            assert config[key] == value, key
        assert (config["frame_skip"], config["stack_num"], config["img_height"], config["img_width"]) == (4, 4, 84, 84)
        assert config["max_episode_steps"] == 27000 and config["gray_scale"] and not config["reward_clip"]
        description = env.protocol_description
        assert description.startswith(ATARI_PROTOCOLS[protocol].source)
        assert ("episodic life" in description) == expected["episodic_life"]
        assert ("sign-clipped rewards" in description) == (mode == "train")
        # What a life loss restarts is named where it happens.
        assert ("at reset and life loss" in description) == expected["episodic_life"]


@pytest.mark.parametrize("env_id, num_threads, expected", [("CartPole-v1", None, 1), ("Acrobot-v1", None, 1),
                                                           ("CartPole-v1", 2, 2), ("Breakout-v5", None, 0)])
def test_envpool_worker_threads(env_id, num_threads, expected):
    """One worker for classic control unless told otherwise; envpool's own default (0) for Atari."""
    with make_env(env_id, 4, num_threads=num_threads) as env:
        assert env._pool.config["num_threads"] == expected


def test_worker_threads_do_not_change_the_steps():
    rng = np.random.default_rng(0)
    actions = rng.integers(2, size=(300, 8))
    with make_env("CartPole-v1", 8, seed=3) as one, make_env("CartPole-v1", 8, seed=3, num_threads=2) as two:
        np.testing.assert_array_equal(one.reset(), two.reset())
        for step_actions in actions:
            a, b = one.step(step_actions), two.step(step_actions)
            for field in ("obs", "next_obs", "rewards", "terminated", "truncated"):
                np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)


@pytest.mark.parametrize("protocol, mode, sticky, episodic_life", [("cleanrl", "train", 0.0, True),
                                                                    ("cleanrl", "eval", 0.0, True),
                                                                    ("machado", "train", 0.25, False)])
def test_protocols_configure_the_gymnasium_fallback(protocol, mode, sticky, episodic_life):
    with make_env("ALE/Breakout-v5", 1, protocol=protocol, mode=mode) as env:
        game = env._vec.envs[0]
        assert game.unwrapped.ale.getFloat("repeat_action_probability") == pytest.approx(sticky)
        assert env.atari.episodic_life == episodic_life and env.atari.sticky_actions == sticky


@pytest.mark.parametrize("env_id", ["Breakout-v5", "ALE/Breakout-v5"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_fire_is_pressed_after_every_life_loss(env_id, mode):
    """Breakout's ball comes only with FIRE: an agent that never presses it (all no-ops) must
    still lose its lives one by one, in evaluation too, not stall until the time limit."""
    with make_env(env_id, 1, seed=4, mode=mode) as env:
        env.reset()
        for step in range(2_000):
            res = env.step(np.zeros(1, np.int64))
            if len(res.episode_returns):
                assert res.episode_env_ids.tolist() == [0] and res.terminated[0] and not res.truncated[0]
                break
        else:
            pytest.fail(f"no game ended within {step + 1} no-op steps: FIRE was not pressed after a life loss")


def test_unknown_env_id_suggests_close_matches():
    with pytest.raises(ValueError, match="CartPole-v1"):
        make_env("CartPol-v1")
    with pytest.raises(ValueError, match="ALE/Pong-v5"):
        make_env("Pong-v5", backend="gymnasium")
    with pytest.raises(ValueError, match="unknown env_id 'ALE/Pong-v5'.*envpool"):
        make_env("ALE/Pong-v5", backend="envpool")
    with pytest.raises(ValueError, match="unknown env_id 'NoSuchGame-v0'"):
        make_env("NoSuchGame-v0")
    with pytest.raises(ValueError) as error:  # an id both envpool and gymnasium know is suggested once
        make_env("CartPol-v1")
    suggested = re.findall(r"'([^']+)'", str(error.value).split("did you mean")[1])
    assert suggested[0] == "CartPole-v1" and len(suggested) == len(set(suggested))


def test_your_own_env_is_reached_as_module_colon_id_which_imports_the_module(own_env_module):
    own_env_module("fastdqn_test_chain", "FastdqnChain-v0")
    assert "FastdqnChain-v0" not in gym.registry
    with make_env("fastdqn_test_chain:FastdqnChain-v0", 2, 0) as env:
        assert env.backend == "gymnasium" and env.env_id == "FastdqnChain-v0" and env.max_episode_steps == 10
        env.reset()
        for _ in range(3):
            result = env.step(np.ones(2, np.int64))
        assert result.terminated.all() and result.episode_returns.tolist() == [1.0, 1.0]
    with pytest.raises(ValueError, match="module 'fastdqn_test_chain' was imported but did not register 'Chian-v0'"):
        make_env("fastdqn_test_chain:Chian-v0")
    with pytest.raises(ModuleNotFoundError, match="no module named 'fastdqn_no_such_module' .*PYTHONPATH"):
        make_env("fastdqn_no_such_module:FastdqnChain-v0")
    with pytest.raises(ValueError, match="must be an id or 'module:id'"):
        make_env(":FastdqnChain-v0")
    with pytest.raises(ValueError, match="for your own env, name the module that registers it: 'module:NoSuchGame-v0'"):
        make_env("NoSuchGame-v0")


def test_a_module_that_fails_its_own_import_keeps_its_error(tmp_path, monkeypatch):
    (tmp_path / "fastdqn_test_broken_envs.py").write_text("import fastdqn_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="No module named 'fastdqn_no_such_dependency'"):
        make_env("fastdqn_test_broken_envs:Anything-v0")


def test_a_gymnasium_env_whose_dependency_is_missing_raises_import_error():
    if importlib.util.find_spec("Box2D") is not None:  # not in fastdqn's extras
        pytest.skip("Box2D is installed")
    with pytest.raises(ImportError, match="LunarLander-v3 needs a package that is not installed: Box2D"):
        make_env("LunarLander-v3", backend="gymnasium")


@pytest.mark.parametrize("env_id, backend, space", [("FrozenLake-v1", "auto", r"Discrete\(16\)"),
                                                    ("FrozenLake-v1", "gymnasium", r"Discrete\(16\)"),
                                                    ("Blackjack-v1", "gymnasium", r"Tuple\(Discrete")])
def test_an_env_without_array_observations_is_refused_by_name(env_id, backend, space):
    with pytest.raises(ValueError, match=rf"DQN needs a numeric Box observation space \(an array\); {env_id} has {space}"):
        make_env(env_id, backend=backend)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(num_envs=0), ValueError, "num_envs"),
        (dict(num_envs=2.0), TypeError, "num_envs"),
        (dict(num_envs=True), TypeError, "num_envs"),
        (dict(seed=-1), ValueError, "seed"),
        (dict(mode="test"), ValueError, "mode"),
        (dict(protocol="dopamine"), ValueError, "protocol"),
        (dict(backend="jax"), ValueError, "backend"),
        (dict(num_envs=2, batch_size=3), ValueError, "batch_size"),
        (dict(num_envs=2, batch_size=1, backend="gymnasium"), ValueError, "batch_size < num_envs"),
        (dict(max_episode_steps=0), ValueError, "max_episode_steps"),
        (dict(render="no"), TypeError, "render must be a bool, got str"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        make_env("CartPole-v1", **kwargs)


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_continuous_actions_are_refused(backend):
    with pytest.raises(ValueError, match="Discrete"):
        make_env("Pendulum-v1", backend=backend)


def test_bad_protocol_settings():
    with pytest.raises(ValueError, match="noop_max"):
        dataclasses.replace(ATARI_PROTOCOLS["cleanrl"], noop_max=0)
    with pytest.raises(ValueError, match="sticky_actions"):
        AtariProtocol(name="x", source="x", noop_max=1, sticky_actions=1.0, fire_reset=False,
                      episodic_life=False, clip_rewards=False)


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_bad_actions(backend):
    with make_env("CartPole-v1", 2, backend=backend) as env:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(2, int))
        env.reset()
        with pytest.raises(ValueError, match="shape"):
            env.step(np.zeros(3, int))
        with pytest.raises(TypeError, match="integers"):
            env.step(np.zeros(2))
        with pytest.raises(ValueError, match=r"\[0, 2\)"):
            env.step(np.array([0, 2]))
        assert env.step(np.array([0, 1])).valid.all()  # the refused calls changed nothing
    with make_env("CartPole-v1", 4, batch_size=2) as env:  # async: some envs at a time
        env.async_reset()
        ids = env.recv().env_ids
        for env_ids, error, match in [(ids[::-1].astype(float) + 0.7, TypeError, "1-D array of integers"),
                                      (ids[None], TypeError, "1-D array of integers"),
                                      (np.array([ids[0], ids[0]]), ValueError, "distinct"),
                                      (np.array([ids[0], 4]), ValueError, r"\[0, 4\)")]:
            with pytest.raises(error, match=match):
                env.send(np.zeros(2, np.int64), env_ids)
        env.send(np.zeros(2, np.int64), ids)
        # The refused calls queued nothing: the two other envs' resets and these two steps come back.
        assert sorted([*env.recv().env_ids, *env.recv().env_ids]) == [0, 1, 2, 3]


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_recv_without_envs_stepping_is_refused_rather_than_waiting_or_returning_nothing(backend):
    with make_env("CartPole-v1", 2, backend=backend) as env:
        with pytest.raises(RuntimeError, match="recv\\(\\) with 0 envs stepping"):
            env.recv()  # before any reset
        env.reset()
        with pytest.raises(RuntimeError, match="send\\(\\) actions"):
            env.recv()  # nothing sent
        env.send(np.zeros(2, np.int64))
        assert env.recv().valid.all()
        with pytest.raises(RuntimeError, match="recv\\(\\) with 0 envs stepping"):
            env.recv()  # the results were taken
    if backend == "envpool":
        with make_env("CartPole-v1", 4, batch_size=2) as env:  # async: envpool's recv would block forever
            env.async_reset()
            first, second = env.recv(), env.recv()
            assert sorted([*first.env_ids, *second.env_ids]) == [0, 1, 2, 3]
            with pytest.raises(RuntimeError, match="recv\\(\\) with 0 envs stepping, fewer than its batch of 2"):
                env.recv()
    env = make_env("CartPole-v1", 2, backend=backend)
    env.close()
    with pytest.raises(RuntimeError, match="closed"):
        env.recv()


def test_a_closed_env_refuses_to_step_or_reset():
    env = make_env("CartPole-v1", 2, 0)
    env.reset()
    env.close()
    assert env.closed
    for call in (env.reset, lambda: env.step(np.zeros(2, np.int64)), env.async_reset):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_atari_frames_are_the_ale_screen_on_both_backends():
    """envpool renders what gymnasium's ALE env renders: the game's own 210x160 colour screen, at every step
    of a whole game, through its life losses (Breakout presses FIRE after each) to the game's end."""
    rng = np.random.default_rng(1)
    with make_env("Breakout-v5", 2, 0, mode="eval", protocol=DETERMINISTIC_CLEANRL, render=True) as ep, \
            make_env("ALE/Breakout-v5", 2, 0, mode="eval", protocol=DETERMINISTIC_CLEANRL, render=True) as gy:
        assert ep.render_fps == gy.render_fps == 60 / 4
        ep.reset(), gy.reset()
        first = ep.render(0)
        assert first.shape == (210, 160, 3) and first.dtype == np.uint8
        assert (first[..., 0] != first[..., 1]).any()  # colour, not the agent's grayscale
        np.testing.assert_array_equal(first, gy.render(0))
        for step in range(3000):
            actions = rng.integers(ep.num_actions, size=2)
            a, b = ep.step(actions), gy.step(actions)
            np.testing.assert_array_equal(ep.render(0), gy.render(0), err_msg=f"step {step}")
            np.testing.assert_array_equal(ep.render(1), gy.render(1), err_msg=f"step {step}")
            if 0 in a.episode_env_ids:
                break
        else:
            pytest.fail("no game ended")
        assert 0 in b.episode_env_ids and not np.array_equal(ep.render(0), first)


@pytest.mark.parametrize("backend", ["envpool", "gymnasium"])
def test_classic_control_renders_at_gymnasiums_frame_rate(backend):
    with make_env("CartPole-v1", 1, 0, backend=backend, render=True) as env:
        env.reset()
        frame = env.render()
        assert frame.shape == (400, 600, 3) and frame.dtype == np.uint8
        assert env.render_fps == gym.make("CartPole-v1").metadata["render_fps"]


def test_box2d_envs_on_envpool_render_at_gymnasiums_frame_rate_without_box2d(monkeypatch):
    import gymnasium.envs

    from fastdqn import envs

    source = (Path(gymnasium.envs.__file__).parent / "box2d" / "lunar_lander.py").read_text()
    fps = float(re.search(r"^FPS = (\d+)", source, re.MULTILINE).group(1))  # what gymnasium's class would say

    def without_box2d(entry_point):
        raise gym.error.DependencyNotInstalled("Box2D is not installed")  # as where the train extra alone is

    monkeypatch.setattr(envs, "load_env_creator", without_box2d)
    with make_env("LunarLander-v3", 1, 0, backend="envpool", render=True) as env:
        assert env.render_fps == fps


def test_render_errors(monkeypatch):
    with make_env("CartPole-v1", 2, 0) as env:
        env.reset()
        with pytest.raises(RuntimeError, match="render=True"):
            env.render()
    with make_env("CartPole-v1", 2, 0, render=True) as env:
        env.reset()
        with pytest.raises(ValueError, match="env_id"):
            env.render(2)

    class Unrenderable(gym.Env):
        metadata = {"render_modes": []}
        observation_space = gym.spaces.Box(0, 1, (2,), np.float32)
        action_space = gym.spaces.Discrete(2)

        def __init__(self, render_mode=None):
            self.render_mode = render_mode

    class NoRenderMode(gym.Env):  # the shortest env gymnasium allows: its constructor takes no render_mode
        observation_space = gym.spaces.Box(0, 1, (2,), np.float32)
        action_space = gym.spaces.Discrete(2)

    gym.register("fastdqn-test/Unrenderable-v0", entry_point=Unrenderable)
    gym.register("fastdqn-test/NoRenderMode-v0", entry_point=NoRenderMode)
    try:
        with pytest.raises(ValueError, match="does not render frames"):
            make_env("fastdqn-test/Unrenderable-v0", 1, 0, render=True)
        make_env("fastdqn-test/Unrenderable-v0", 1, 0).close()  # without a video it runs
        with pytest.raises(ValueError, match="does not render frames .*its constructor takes no render_mode"):
            make_env("fastdqn-test/NoRenderMode-v0", 1, 0, render=True)
    finally:
        gym.registry.pop("fastdqn-test/Unrenderable-v0")
        gym.registry.pop("fastdqn-test/NoRenderMode-v0")

    import importlib.metadata

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "0.8.4" if name == "envpool" else real_version(name))
    with pytest.raises(ValueError, match="needs envpool 1.0.1 or newer, installed 0.8.4"):
        make_env("Pong-v5", 1, 0, render=True)


@pytest.mark.parametrize("env_id,backend", [("Pong-v5", "envpool"), ("ALE/Pong-v5", "gymnasium"),
                                            ("PongNoFrameskip-v4", "gymnasium"), ("Breakout-v4", "gymnasium")])
def test_every_atari_id_is_played_as_atari_and_named_so(env_id, backend):
    from fastdqn.envs import is_atari_id

    with make_env(env_id, 1, 0) as env:
        assert env.backend == backend and env.protocol == "cleanrl" and env.obs_shape == (4, 84, 84)
    assert is_atari_id(env_id)


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1", "MountainCar-v0", "NotAnEnv-v0"])
def test_other_ids_are_not_atari(env_id):
    from fastdqn.envs import is_atari_id

    assert not is_atari_id(env_id)

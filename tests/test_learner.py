"""The learner against a textbook DQN written per transition with plain loops.

The reference below shares no code with fastdqn.learner: it computes each transition's
target and loss one at a time, clips and applies Adam/RMSprop by hand, and updates the
target network with an explicit counter.
"""

import copy
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fastdqn import manual_mlp
from fastdqn.learner import Learner
from fastdqn.networks import MLP, build_q_network

OBS_DIM, NUM_ACTIONS, BATCH = 3, 3, 6


class ReferenceDQN:
    def __init__(self, net, *, lr, optimizer="adam", adam_eps=1e-8, rmsprop_alpha=0.95, rmsprop_eps=0.01,
                 rmsprop_centered=True, loss="huber", double_dqn=False, target_update_interval=1000, tau=1.0,
                 max_grad_norm=10.0, prioritized=False):
        self.online = copy.deepcopy(net)
        self.target = copy.deepcopy(net)
        self.params = list(self.online.parameters())
        self.opt = dict(lr=lr, kind=optimizer, eps=adam_eps, alpha=rmsprop_alpha, rms_eps=rmsprop_eps,
                        centered=rmsprop_centered)
        self.slots = [{"m": torch.zeros_like(p), "v": torch.zeros_like(p)} for p in self.params]
        self.loss_kind, self.double = loss, double_dqn
        self.interval, self.tau = target_update_interval, tau
        self.max_grad_norm, self.prioritized = max_grad_norm, prioritized
        self.updates = 0
        self.clipped = False

    def transition_losses(self, batch):
        losses, td_abs, self.q_taken = [], [], []
        for i in range(len(batch["actions"])):
            obs = torch.as_tensor(batch["obs"][i:i + 1])
            next_obs = torch.as_tensor(batch["next_obs"][i:i + 1])
            q = self.online(obs)[0]
            with torch.no_grad():
                target_q = [float(v) for v in self.target(next_obs)[0]]
                chooser = [float(v) for v in self.online(next_obs)[0]] if self.double else target_q
                best = max(range(len(chooser)), key=lambda a: chooser[a])
                y = float(batch["rewards"][i]) + float(batch["discounts"][i]) * target_q[best]
            delta = q[int(batch["actions"][i])] - y
            self.q_taken.append(q[int(batch["actions"][i])].item())
            if self.loss_kind == "huber":
                loss = 0.5 * delta ** 2 if abs(delta.item()) < 1.0 else abs(delta) - 0.5
            else:
                loss = delta ** 2
            weight = float(batch["weights"][i]) if self.prioritized else 1.0
            losses.append(weight * loss)
            td_abs.append(abs(delta.item()))
        return losses, td_abs

    def step(self, batch):
        for p in self.params:
            p.grad = None
        losses, td_abs = self.transition_losses(batch)
        loss = sum(losses) / len(losses)
        loss.backward()
        grads = [p.grad for p in self.params]
        norm = self.grad_norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
        if self.max_grad_norm is not None:
            scale = min(1.0, self.max_grad_norm / (norm + 1e-6))
            self.clipped |= scale < 1.0
            grads = [g * scale for g in grads]
        self.updates += 1
        t, o = self.updates, self.opt
        with torch.no_grad():
            for p, g, s in zip(self.params, grads, self.slots):
                if o["kind"] == "adam":
                    s["m"] = 0.9 * s["m"] + 0.1 * g
                    s["v"] = 0.999 * s["v"] + 0.001 * g * g
                    m_hat, v_hat = s["m"] / (1 - 0.9 ** t), s["v"] / (1 - 0.999 ** t)
                    p -= o["lr"] * m_hat / (v_hat.sqrt() + o["eps"])
                else:
                    s["v"] = o["alpha"] * s["v"] + (1 - o["alpha"]) * g * g
                    s["m"] = o["alpha"] * s["m"] + (1 - o["alpha"]) * g
                    variance = s["v"] - s["m"] * s["m"] if o["centered"] else s["v"]
                    p -= o["lr"] * g / (variance.sqrt() + o["rms_eps"])
            if self.updates % self.interval == 0:
                for target_p, p in zip(self.target.parameters(), self.params):
                    target_p.copy_(target_p + self.tau * (p - target_p))
        return loss.item(), td_abs


def make_batch(rng, batch_size=BATCH, obs_dim=OBS_DIM, num_actions=NUM_ACTIONS):
    return {
        "obs": rng.normal(size=(batch_size, obs_dim)).astype(np.float32),
        "actions": rng.integers(0, num_actions, size=batch_size),
        "rewards": rng.normal(size=batch_size).astype(np.float32),
        "next_obs": rng.normal(size=(batch_size, obs_dim)).astype(np.float32),
        # gamma**n folded in by the buffer, 0 where the episode terminated.
        "discounts": rng.choice([0.0, 0.99, 0.99 ** 3], size=batch_size).astype(np.float32),
        "weights": rng.uniform(0.2, 1.0, size=batch_size).astype(np.float32),
    }


def make_net(seed=0, dueling=False, hidden_sizes=(16,), wrapped=False):
    """fastdqn's MLP (trained through manual_mlp unless dueling), or, wrapped, the same MLP
    inside a user's module (trained through autograd)."""
    torch.manual_seed(seed)
    net = MLP(OBS_DIM, NUM_ACTIONS, hidden_sizes=hidden_sizes, dueling=dueling)
    return torch.nn.Sequential(net) if wrapped else net


def make_learner(net, **kwargs):
    kwargs.setdefault("lr", 1e-2)
    return Learner(copy.deepcopy(net), obs_shape=(OBS_DIM,), obs_dtype=np.float32, batch_size=BATCH,
                   num_envs=4, device="cpu", **kwargs)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


def assert_close(actual, expected, atol=2e-5):
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=atol, rtol=1e-4)


CONFIGS = {
    "huber": dict(loss="huber"),
    "mse": dict(loss="mse"),
    "double": dict(double_dqn=True),
    "prioritized": dict(prioritized=True),
    "clipped": dict(max_grad_norm=0.05),
    "no-clip": dict(max_grad_norm=None),
    "soft-target": dict(target_update_interval=1, tau=0.3),
    "rmsprop-double-per-mse": dict(optimizer="rmsprop", loss="mse", double_dqn=True, prioritized=True,
                                   max_grad_norm=0.05, lr=1e-3),
    "dueling": dict(dueling=True, double_dqn=True),
    "two-hidden-layers": dict(hidden_sizes=(16, 8), double_dqn=True, prioritized=True, max_grad_norm=0.05),
    "user-module": dict(wrapped=True, hidden_sizes=(16, 8), prioritized=True),
}
NET_OPTIONS = ("dueling", "hidden_sizes", "wrapped")


@pytest.mark.parametrize("name", CONFIGS)
def test_update_matches_textbook_reference(name):
    config = dict(CONFIGS[name])
    net = make_net(seed=1, **{key: config.pop(key) for key in NET_OPTIONS if key in config})
    config.setdefault("target_update_interval", 2)
    learner = make_learner(net, **config)
    reference = ReferenceDQN(net, **{"lr": 1e-2, **config})
    rng = np.random.default_rng(7)
    ref_losses, ref_q_means, ref_grad_norms = [], [], []
    for _ in range(5):
        batch = make_batch(rng)
        learner.update(batch)
        ref_loss, td_abs = reference.step(batch)
        ref_losses.append(ref_loss)
        ref_q_means.append(np.mean(reference.q_taken))
        ref_grad_norms.append(reference.grad_norm)
        assert_close(params(learner.q_network), params(reference.online))
        assert_close(params(learner.target_network), params(reference.target))
        torch.testing.assert_close(learner.new_priorities, torch.tensor(td_abs), atol=2e-5, rtol=1e-4)
    if config.get("max_grad_norm") == 0.05:
        assert reference.clipped, "the test batch should be large enough to trigger clipping"
    metrics = learner.metrics()
    assert metrics["updates"] == 5
    assert metrics["loss"] == pytest.approx(np.mean(ref_losses), rel=1e-4)
    assert metrics["q_mean"] == pytest.approx(np.mean(ref_q_means), rel=1e-4, abs=1e-6)
    assert metrics["grad_norm"] == pytest.approx(np.mean(ref_grad_norms), rel=1e-4)


def frozen_first_layer():
    net = make_net()
    net.body[0].requires_grad_(False)
    return net


@pytest.mark.parametrize("make, manual", [
    (make_net, True), (lambda: make_net(hidden_sizes=()), True), (lambda: make_net(dueling=True), False),
    (lambda: make_net(wrapped=True), False), (frozen_first_layer, False),
])
def test_only_fastdqns_plain_mlp_skips_autograd(make, manual):
    learner = make_learner(make())
    assert learner.manual_gradient == manual
    assert isinstance(learner._td_gradient, manual_mlp.MLPTDGradient) == manual
    assert isinstance(learner._act_q_values, manual_mlp.MLPForward) == manual


@pytest.mark.parametrize("loss", ["huber", "mse"])
def test_manual_mlp_step_matches_autograd_over_many_updates(loss):
    # uint8 frames flattened by the MLP, two hidden layers, every option that changes the gradient.
    obs_shape, batch_size = (2, 3, 3), 32
    torch.manual_seed(5)
    net = MLP(18, 4, hidden_sizes=(32, 16))
    options = dict(obs_shape=obs_shape, obs_dtype=np.uint8, batch_size=batch_size, num_envs=8, device="cpu",
                   lr=3e-3, loss=loss, double_dqn=True, prioritized=True, max_grad_norm=1.0, target_update_interval=3)
    manual = Learner(copy.deepcopy(net), **options)
    autograd = Learner(torch.nn.Sequential(copy.deepcopy(net)), **options)
    assert manual.manual_gradient and not autograd.manual_gradient
    rng = np.random.default_rng(6)
    for _ in range(20):
        batch = dict(make_batch(rng, batch_size, num_actions=4),
                     obs=rng.integers(0, 256, (batch_size, *obs_shape), dtype=np.uint8),
                     next_obs=rng.integers(0, 256, (batch_size, *obs_shape), dtype=np.uint8))
        for learner in (manual, autograd):
            learner.update(batch)
        torch.testing.assert_close(manual.new_priorities, autograd.new_priorities, atol=1e-4, rtol=1e-5)
    for module in ("q_network", "target_network"):
        assert_close(params(getattr(manual, module)), params(getattr(autograd, module)), atol=1e-5)
    assert manual.metrics() == pytest.approx(autograd.metrics(), rel=1e-5)
    obs = rng.integers(0, 256, (8, *obs_shape), dtype=np.uint8)
    assert torch.equal(manual.act(obs, 0.0), autograd.act(obs, 0.0))


def test_reference_comparison_can_tell_double_dqn_apart():
    # Guards the test above: with these batches Double DQN changes the result.
    net = make_net(seed=1)
    learner = make_learner(net, double_dqn=True, target_update_interval=3)
    reference = ReferenceDQN(net, lr=1e-2, double_dqn=False, target_update_interval=3)
    rng = np.random.default_rng(7)
    for _ in range(3):
        batch = make_batch(rng)
        learner.update(batch)
        reference.step(batch)
    differs = [not torch.allclose(a, b, atol=1e-4) for a, b in zip(params(learner.q_network),
                                                                    params(reference.online))]
    assert any(differs)


def test_hard_target_update_copies_online_every_interval_exactly():
    learner = make_learner(make_net(seed=2), target_update_interval=3, tau=1.0)
    initial_target = params(learner.target_network)
    rng = np.random.default_rng(0)
    last_copy = initial_target
    for update in range(1, 8):
        learner.update(make_batch(rng))
        target = params(learner.target_network)
        if update % 3 == 0:
            last_copy = params(learner.q_network)
            assert all(torch.equal(t, o) for t, o in zip(target, last_copy))
        else:
            assert all(torch.equal(t, c) for t, c in zip(target, last_copy))
            assert not all(torch.equal(t, o) for t, o in zip(target, params(learner.q_network)))


def test_soft_target_update_is_a_lerp_towards_online_every_update():
    learner = make_learner(make_net(seed=3), target_update_interval=1, tau=0.1)
    rng = np.random.default_rng(1)
    for _ in range(4):
        before = params(learner.target_network)
        learner.update(make_batch(rng))
        online = params(learner.q_network)
        expected = [b + 0.1 * (o - b) for b, o in zip(before, online)]
        assert_close(params(learner.target_network), expected, atol=1e-6)


def test_batch_may_be_an_object_of_tensors_and_weights_are_ignored_without_per():
    net = make_net(seed=4)
    rng = np.random.default_rng(2)
    batches = [make_batch(rng) for _ in range(3)]
    from_dicts, from_objects = make_learner(net), make_learner(net)
    for batch in batches:
        from_dicts.update({k: v for k, v in batch.items() if k != "weights"})
        tensors = {k: torch.from_numpy(v) for k, v in batch.items()}
        tensors["actions"] = tensors["actions"].to(torch.int32)  # any integer dtype is accepted
        from_objects.update(SimpleNamespace(**tensors))
    assert_close(params(from_objects.q_network), params(from_dicts.q_network), atol=0)


@pytest.mark.parametrize("action_dtype", [np.int64, np.int32])  # int32 is converted, int64 read in place
def test_batch_arrays_refilled_in_place_train_like_fresh_batches(action_dtype):
    # The agent samples into the same arrays every update; the learner must read their new contents.
    net = make_net(seed=6, hidden_sizes=(16, 8))
    rng = np.random.default_rng(12)
    batches = [make_batch(rng) for _ in range(4)]
    fresh, refilled = make_learner(net, prioritized=True), make_learner(net, prioritized=True)
    reused = {k: np.empty_like(v, dtype=action_dtype if k == "actions" else None) for k, v in batches[0].items()}
    for batch in batches:
        fresh.update({k: v.copy() for k, v in batch.items()})
        for name, array in reused.items():
            array[...] = batch[name]
        refilled.update(reused)
        torch.testing.assert_close(refilled.new_priorities, fresh.new_priorities, atol=0, rtol=0)
    assert_close(params(refilled.q_network), params(fresh.q_network), atol=0)


def test_trainable_parameters_must_share_a_dtype():
    net = torch.nn.Sequential(torch.nn.Linear(OBS_DIM, 4), torch.nn.Linear(4, NUM_ACTIONS))
    net[1].double()
    net.forward = lambda x: net[1](net[0](x.float()).double()).float()
    with pytest.raises(ValueError, match="q_network's trainable parameters must share one dtype"):
        make_learner(net)


def test_shared_frame_batches_train_exactly_like_unpacked_batches():
    k, n_step, frame = 4, 3, (5, 5)
    torch.manual_seed(11)
    net = MLP(k * 5 * 5, NUM_ACTIONS, hidden_sizes=(16,))  # flattens the (4, 5, 5) uint8 stack
    rng = np.random.default_rng(10)

    def learner():
        return Learner(copy.deepcopy(net), obs_shape=(k, *frame), obs_dtype=np.uint8, batch_size=BATCH,
                       num_envs=2, device="cpu", lr=1e-2, double_dqn=True, target_update_interval=2)

    unpacked, shared = learner(), learner()
    for _ in range(4):
        frames = rng.integers(0, 256, (BATCH, k + n_step, *frame), dtype=np.uint8)
        next_offset = rng.integers(1, n_step + 1, BATCH)  # m <= n_step steps later
        rest = make_batch(rng)
        del rest["obs"], rest["next_obs"]
        obs = np.stack([frames[b, :k] for b in range(BATCH)])
        next_obs = np.stack([frames[b, next_offset[b]:next_offset[b] + k] for b in range(BATCH)])
        unpacked.update(dict(rest, obs=obs, next_obs=next_obs))
        shared.update(SimpleNamespace(frames=frames, next_offset=next_offset, **rest))
        torch.testing.assert_close(shared.new_priorities, unpacked.new_priorities, atol=0, rtol=0)
    for module in ("q_network", "target_network"):
        for a, b in zip(params(getattr(shared, module)), params(getattr(unpacked, module))):
            assert torch.equal(a, b)
    with pytest.raises(ValueError, match=r"batch\.frames must have shape \(6, 7, 5, 5\), got \(6, 3, 5, 5\)"):
        shared.update(dict(rest, frames=frames[:, :3], next_offset=next_offset))


@pytest.mark.parametrize("network", ["manual", "dueling", "wrapped"])
def test_targets_computed_ahead_for_several_batches_give_the_same_updates(network):
    """target_values over the batches of a stretch between target changes (one forward pass),
    handed to update as next_q, against updates that compute their own targets: the same up
    to float rounding (a matrix product's kernel may change with its row count; for
    CartPole's 128 and 4,096 rows on the CI's CPU the results are bitwise equal)."""
    nets = {"manual": lambda: make_net(), "dueling": lambda: make_net(dueling=True),
            "wrapped": lambda: make_net(wrapped=True)}
    learners = [Learner(nets[network](), obs_shape=(OBS_DIM,), obs_dtype=np.float32, batch_size=BATCH, num_envs=2,
                        device="cpu", lr=1e-2, target_update_interval=3) for _ in range(2)]
    own, ahead = learners
    assert own.manual_gradient == (network == "manual")
    rng = np.random.default_rng(4)
    for stretch in (3, 3, 2):  # the target changes after every third update
        batches = [make_batch(rng) for _ in range(stretch)]
        next_q = ahead.target_values(np.concatenate([b["next_obs"] for b in batches]))
        for i, batch in enumerate(batches):
            own.update(batch)
            ahead.update(batch, next_q=next_q[i * BATCH:(i + 1) * BATCH])
            torch.testing.assert_close(ahead.new_priorities, own.new_priorities, atol=1e-5, rtol=1e-5)
    for module in ("q_network", "target_network"):
        assert_close(params(getattr(ahead, module)), params(getattr(own, module)))
    assert not all(torch.equal(a, b) for a, b in zip(params(own.target_network), params(make_net())))  # it trained


def test_targets_computed_ahead_are_refused_where_they_do_not_apply():
    double = Learner(make_net(), obs_shape=(OBS_DIM,), obs_dtype=np.float32, batch_size=BATCH, num_envs=2,
                     device="cpu", double_dqn=True)
    batch = make_batch(np.random.default_rng(0))
    with pytest.raises(ValueError, match="Double DQN"):
        double.update(batch, next_q=torch.zeros(BATCH))
    plain = Learner(make_net(), obs_shape=(OBS_DIM,), obs_dtype=np.float32, batch_size=BATCH, num_envs=2, device="cpu")
    with pytest.raises(ValueError, match=rf"next_q must have shape \({BATCH},\)"):  # not broadcast
        plain.update(batch, next_q=torch.zeros(1))
    assert plain.num_updates == 0
    frames = Learner(MLP(4 * 5 * 5, NUM_ACTIONS, hidden_sizes=(16,)), obs_shape=(4, 5, 5), obs_dtype=np.uint8,
                     batch_size=BATCH, num_envs=2, device="cpu")
    framed = dict(batch, frames=np.zeros((BATCH, 5, 5, 5), np.uint8), next_offset=np.ones(BATCH, np.int64))
    del framed["obs"], framed["next_obs"]
    with pytest.raises(ValueError, match="frames"):
        frames.update(framed, next_q=torch.zeros(BATCH))


def test_shared_frame_batches_need_frame_stacked_observations():
    learner = make_learner(make_net())
    batch = make_batch(np.random.default_rng(11))
    with pytest.raises(ValueError, match="batch.frames must have shape"):
        learner.update(dict(batch, frames=np.zeros((BATCH, 5), np.float32), next_offset=np.ones(BATCH, np.int64)))


def test_bad_batches_raise_before_any_state_changes():
    learner = make_learner(make_net(seed=5), prioritized=True)
    before = params(learner.q_network)
    batch = make_batch(np.random.default_rng(3))
    bad_shape = dict(batch, next_obs=batch["next_obs"][:, :2])
    with pytest.raises(ValueError, match=r"batch\.next_obs must have shape \(6, 3\)"):
        learner.update(bad_shape)
    no_weights = {k: v for k, v in batch.items() if k != "weights"}
    with pytest.raises(ValueError, match="weights"):
        learner.update(no_weights)
    # Casts that would change the batch: observations of another dtype, float actions, integer rewards.
    for field, value, error, match in [
            ("obs", batch["obs"].astype(np.float64), TypeError, "batch.obs must have dtype torch.float32"),
            ("next_obs", (batch["next_obs"] * 100).astype(np.uint8), TypeError, "batch.next_obs must have dtype"),
            ("actions", batch["actions"] + 0.7, TypeError, "batch.actions must hold integers, got torch.float64"),
            ("rewards", np.ones(BATCH, np.int64), TypeError, "batch.rewards must be floating point"),
            ("actions", np.full(BATCH, NUM_ACTIONS), ValueError, rf"batch.actions must be in \[0, {NUM_ACTIONS}\)"),
            ("actions", np.full(BATCH, -1), ValueError, r"batch.actions must be in \[0, 3\), got -1..-1")]:
        with pytest.raises(error, match=match):
            learner.update({**batch, field: value})
    assert learner.num_updates == 0
    assert all(torch.equal(a, b) for a, b in zip(params(learner.q_network), before))
    assert math.isnan(learner.metrics()["loss"])


def test_actions_of_any_integer_dtype_train():
    from fastdqn import ReplayBuffer

    for dtype in (np.uint8, np.uint16, np.uint32, np.uint64, np.int32):
        buffer = ReplayBuffer(64, (OBS_DIM,), obs_dtype=np.float32, action_dtype=dtype, seed=0)
        obs = np.zeros((1, OBS_DIM), np.float32)
        for step in range(10):
            next_obs = np.full((1, OBS_DIM), step + 1.0, np.float32)
            buffer.add(obs, np.array([2], dtype), np.zeros(1, np.float32), next_obs, [False], [False])
            obs = next_obs
        learner = make_learner(make_net())
        learner.update(buffer.sample(BATCH))
        assert learner.num_updates == 1, dtype


def test_acting_and_q_values_check_their_observations_alike():
    learner = make_learner(make_net())
    obs = np.random.default_rng(0).normal(size=(2, OBS_DIM)).astype(np.float32)
    expected = learner.q_network(torch.as_tensor(obs))
    torch.testing.assert_close(learner.q_values(obs), expected)  # numpy as act takes it
    torch.testing.assert_close(learner.q_values(torch.as_tensor(obs)), expected)
    for method in (lambda o: learner.act(o, 0.1), learner.q_values):
        with pytest.raises(ValueError, match=r"obs must have shape \(N, \*\(3,\)\), got \(2, 4\)"):
            method(np.zeros((2, 4), np.float32))
        with pytest.raises(TypeError, match="obs must have dtype torch.float32"):
            method(obs.astype(np.float64))
    with pytest.raises(TypeError, match="epsilon must be a number or a 0-d tensor, got NoneType"):
        learner.act(obs, None)


def test_a_state_saved_under_the_other_optimizer_is_refused_before_anything_changes():
    adam, rmsprop = make_learner(make_net(seed=1)), make_learner(make_net(seed=2), optimizer="rmsprop")
    rng = np.random.default_rng(0)
    adam.update(make_batch(rng))
    before = params(rmsprop.q_network)
    with pytest.raises(ValueError, match="the saved optimizer state is Adam's; this learner's optimizer is RMSprop"):
        rmsprop.load_state_dict(adam.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(params(rmsprop.q_network), before))
    rmsprop.update(make_batch(rng))  # and it still trains


def test_fresh_host_batches_are_not_kept_and_reused_ones_are():
    import gc
    import weakref

    learner = make_learner(make_net())
    rng = np.random.default_rng(0)
    fresh = []
    for _ in range(5):  # a new batch each update, as buffer.sample(n) gives
        batch = make_batch(rng)
        fresh.append(weakref.ref(batch["obs"]))
        learner.update(batch)
        del batch
    gc.collect()
    assert all(ref() is None for ref in fresh[:-1])  # (the step's last tensors may still view the newest)
    reused = make_batch(rng)  # sampled into the same arrays each time, as sample(n, out=) does
    for _ in range(3):
        learner.update(reused)
    assert any(values[0] is reused["obs"] for values, _ in learner._host_batches.values())


@pytest.mark.parametrize("kwargs, match", [
    (dict(loss="l1"), "loss"),
    (dict(optimizer="sgd"), "optimizer"),
    (dict(tau=0.0), "tau"),
    (dict(tau=1.5), "tau"),
    (dict(target_update_interval=0), "target_update_interval"),
    (dict(batch_size=0), "batch_size"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"),
    (dict(lr=0), "lr"),
    (dict(cuda_graph=True), "cuda_graph"),
    (dict(cuda_graph="yes"), "cuda_graph"),
    (dict(obs_shape=(4,)), "q_network must map"),
    (dict(seed=-1), "seed"),
    (dict(seed="0"), "seed"),
])
def test_bad_learner_arguments_raise(kwargs, match):
    args = dict(obs_shape=(OBS_DIM,), obs_dtype=np.float32, batch_size=BATCH, num_envs=2, device="cpu")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        Learner(make_net(), **args)


def test_network_output_must_be_batch_by_actions():
    class Scalar(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(OBS_DIM, 1)

        def forward(self, obs):
            return self.linear(obs).squeeze(1)

    with pytest.raises(ValueError, match=r"got output of shape \(2,\)"):
        Learner(Scalar(), obs_shape=(OBS_DIM,), obs_dtype=np.float32, batch_size=2, num_envs=1, device="cpu")


def test_network_must_be_a_module():
    with pytest.raises(TypeError, match="q_network"):
        Learner(lambda x: x, obs_shape=(3,), obs_dtype=np.float32, batch_size=2, num_envs=1, device="cpu")


def test_act_with_zero_epsilon_is_greedy_for_any_batch_size():
    learner = make_learner(make_net(seed=6))
    rng = np.random.default_rng(4)
    for n in (4, 4, 9):  # 4 == num_envs uses the static path, 9 the eager one
        obs = rng.normal(size=(n, OBS_DIM)).astype(np.float32)
        actions = learner.act(obs, 0.0)
        assert actions.dtype == torch.int64 and actions.shape == (n,)
        with torch.no_grad():
            q = learner.q_network(torch.from_numpy(obs)).tolist()
        assert actions.tolist() == [max(range(NUM_ACTIONS), key=lambda a: row[a]) for row in q]
    assert not learner.act_graph_captured  # nothing is captured on CPU


def biased_net(preferred_action):
    net = MLP(OBS_DIM, NUM_ACTIONS, hidden_sizes=())
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
        net.head.bias[preferred_action] = 1.0
    return net


def test_act_with_epsilon_one_is_uniform_over_actions():
    n = 3000
    learner = Learner(biased_net(1), obs_shape=(OBS_DIM,), obs_dtype=np.float32, batch_size=2, num_envs=n,
                      device="cpu", seed=0)
    counts = np.bincount(learner.act(np.zeros((n, OBS_DIM), np.float32), 1.0).numpy(), minlength=NUM_ACTIONS)
    # Each count is Binomial(3000, 1/3): mean 1000, sd 26; 150 is almost 6 sd.
    assert np.all(np.abs(counts - n / NUM_ACTIONS) < 150), counts


def test_act_explores_with_probability_epsilon():
    n = 4000
    learner = Learner(biased_net(2), obs_shape=(OBS_DIM,), obs_dtype=np.float32, batch_size=2, num_envs=n,
                      device="cpu", seed=1)
    actions = learner.act(np.zeros((n, OBS_DIM), np.float32), torch.tensor(0.3)).numpy()
    # Greedy with probability 0.7, plus a random draw that lands on the greedy action 1/3 of the time.
    assert np.mean(actions == 2) == pytest.approx(0.7 + 0.3 / 3, abs=0.03)


def test_act_explores_by_its_own_seeded_generator_whatever_torch_draws():
    obs = np.random.default_rng(2).normal(size=(4, OBS_DIM)).astype(np.float32)
    runs = []
    for seed, torch_seed in ((5, 0), (5, 1), (6, 0)):
        torch.manual_seed(torch_seed)
        learner = make_learner(make_net(seed=3), seed=seed)
        actions = []
        for _ in range(50):
            torch.rand(3)  # other users of torch's generator do not shift the exploration draws
            actions += learner.act(obs, 0.5).tolist() + learner.act(obs[:3], 0.5).tolist()
        runs.append(actions)
    assert runs[0] == runs[1] != runs[2]


class _FixedDraws:
    """Stands in for act_rng: every uniform draw is ``value``."""

    def __init__(self, value):
        self.value = value

    def random(self, size=None, dtype=np.float64, out=None):
        if out is None:
            return np.full(size, self.value, dtype)
        out[...] = self.value
        return out


@pytest.mark.parametrize("n", [4, 9])  # the static path and the eager one
def test_random_actions_span_exactly_the_action_range(n):
    learner = make_learner(biased_net(1))
    obs = np.zeros((n, OBS_DIM), np.float32)
    learner.act_rng = _FixedDraws(np.nextafter(np.float32(1), np.float32(0)))  # the largest draw below 1
    assert learner.act(obs, 1.0).tolist() == [NUM_ACTIONS - 1] * n
    learner.act_rng = _FixedDraws(0.0)
    assert learner.act(obs, 1.0).tolist() == [0] * n
    assert learner.act(obs, 0.0).tolist() == [1] * n  # a draw of 0 is not below epsilon 0: greedy


def test_act_rejects_wrong_observation_shape():
    learner = make_learner(make_net())
    with pytest.raises(ValueError, match="obs must have shape"):
        learner.act(np.zeros((4, OBS_DIM + 1), np.float32), 0.0)


def test_actor_copy_only_changes_on_sync():
    learner = make_learner(make_net(seed=7), actor_copy=True)
    assert learner.actor_network is not learner.q_network
    start = params(learner.actor_network)
    learner.update(make_batch(np.random.default_rng(5)))
    assert all(torch.equal(a, b) for a, b in zip(params(learner.actor_network), start))
    learner.sync_actor()
    assert all(torch.equal(a, b) for a, b in zip(params(learner.actor_network), params(learner.q_network)))


@pytest.mark.parametrize("optimizer, through_file", [("adam", True), ("rmsprop", True), ("adam", False)])
def test_state_dict_round_trip_continues_identically(optimizer, through_file):
    net = make_net(seed=8)
    rng = np.random.default_rng(6)
    batches = [make_batch(rng) for _ in range(6)]
    config = dict(optimizer=optimizer, target_update_interval=2, double_dqn=True)
    original = make_learner(net, **config)
    for batch in batches[:3]:
        original.update(batch)
    if through_file:
        buffer = io.BytesIO()
        torch.save(original.state_dict(), buffer)
        buffer.seek(0)
        state = torch.load(buffer, weights_only=True)
    else:  # handed over live: the two learners must not end up sharing optimizer moments
        state = original.state_dict()
    restored = make_learner(make_net(seed=99), **config)
    restored.load_state_dict(state)
    assert restored.num_updates == 3
    obs = batches[0]["obs"][:4]
    for batch in batches[3:]:
        original.update(batch)
        restored.update(batch)
        assert torch.equal(original.act(obs, 0.5), restored.act(obs, 0.5))  # exploration goes on as it would have
    for module in ("q_network", "target_network"):
        for a, b in zip(params(getattr(original, module)), params(getattr(restored, module))):
            assert torch.equal(a, b)


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_loaded_optimizer_state_runs_the_way_this_device_runs_it(optimizer):
    """A state saved where the optimizer ran differently (a CUDA learner: capturable, not
    fused) loads into this learner's own way of running it, and trains as the original."""
    rng = np.random.default_rng(3)
    batches = [make_batch(rng) for _ in range(4)]
    original = make_learner(make_net(seed=2), optimizer=optimizer)
    own_flags = {key: original.optimizer.param_groups[0].get(key) for key in ("capturable", "fused", "foreach")}
    original.update(batches[0])
    state = copy.deepcopy(original.state_dict())
    for group in state["optimizer"]["param_groups"]:
        group.update(capturable=True, fused=None, foreach=False)
    restored = make_learner(make_net(seed=5), optimizer=optimizer)
    restored.load_state_dict(state)
    assert {key: restored.optimizer.param_groups[0].get(key) for key in own_flags} == own_flags
    for batch in batches[1:]:
        original.update(batch)
        restored.update(batch)
    for a, b in zip(params(original.q_network), params(restored.q_network)):
        assert torch.equal(a, b)


def test_a_state_saved_before_act_rng_existed_loads_with_a_warning():
    original = make_learner(make_net(seed=4))
    original.update(make_batch(np.random.default_rng(8)))
    state = original.state_dict()
    del state["act_rng"]
    restored = make_learner(make_net(seed=9), seed=3)
    before = restored.act_rng.bit_generator.state
    with pytest.warns(UserWarning, match="no act_rng"):
        restored.load_state_dict(state)
    assert restored.num_updates == 1 and restored.act_rng.bit_generator.state == before
    assert all(torch.equal(a, b) for a, b in zip(params(original.q_network), params(restored.q_network)))


def test_metrics_average_since_last_call():
    learner = make_learner(make_net(seed=9))
    rng = np.random.default_rng(8)
    learner.update(make_batch(rng))
    first = learner.metrics()
    learner.update(make_batch(rng))
    learner.update(make_batch(rng))
    second = learner.metrics()
    assert first["updates"] == 1 and second["updates"] == 3
    assert all(math.isfinite(second[k]) for k in ("loss", "q_mean", "grad_norm"))
    assert math.isnan(learner.metrics()["loss"])


def test_learner_trains_the_nature_cnn_on_uint8_frames():
    torch.manual_seed(10)
    net = build_q_network((4, 36, 36), 2)
    learner = Learner(net, obs_shape=(4, 36, 36), obs_dtype=np.uint8, batch_size=4, num_envs=2, device="cpu",
                      lr=1e-3)
    rng = np.random.default_rng(9)
    batch = {"obs": rng.integers(0, 256, (4, 4, 36, 36), dtype=np.uint8), "actions": np.array([0, 1, 0, 1]),
             "rewards": np.ones(4, np.float32), "next_obs": rng.integers(0, 256, (4, 4, 36, 36), dtype=np.uint8),
             "discounts": np.zeros(4, np.float32)}
    # With discounts 0 the target is the reward, 1: the loss must fall as the net fits it.
    losses = []
    for _ in range(8):
        learner.update(batch)
        losses.append(learner.metrics()["loss"])
    assert np.mean(losses[-3:]) < 0.25 * losses[0], losses
    assert learner.act(batch["obs"][:2], 0.0).shape == (2,)


@pytest.mark.parametrize("interval,tau", [(3, 1.0), (1, 0.05), (4, 0.5)])
def test_the_graph_safe_target_update_equals_the_eager_one_on_cpu(interval, tau):
    """The branch-free target update that a CUDA graph holds (a lerp of weight tau or 0 every
    update, counted on the device), run eagerly on CPU against the eager rule (the host counts)."""
    torch.manual_seed(0)
    net = build_q_network((4,), 2, hidden_sizes=(16,))
    learners = [Learner(copy.deepcopy(net), obs_shape=(4,), obs_dtype=np.float32, batch_size=8, num_envs=2,
                        device="cpu", target_update_interval=interval, tau=tau, lr=1e-2) for _ in range(2)]
    learners[1].cuda_graph = True  # the graph's code path, not captured: nothing is on CPU
    rng = np.random.default_rng(3)
    for update in range(10):
        batch = {"obs": rng.normal(size=(8, 4)).astype(np.float32), "actions": rng.integers(0, 2, 8),
                 "rewards": rng.normal(size=8).astype(np.float32), "next_obs": rng.normal(size=(8, 4)).astype(np.float32),
                 "discounts": np.full(8, 0.9, np.float32)}
        before = params(learners[0].target_network)
        for learner in learners:
            learner.update(batch)
        eager, graph_safe = (params(learner.target_network) for learner in learners)
        for a, b in zip(eager, graph_safe):
            assert torch.equal(a, b), update
        moved = any(not torch.equal(a, b) for a, b in zip(before, eager))
        assert moved == ((update + 1) % interval == 0), update  # the eager rule updates when due, only then


# ---------------------------------------------------------------------------------------- CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_batches(obs_shape, obs_dtype, batch_size, num_actions, count, seed, n_step=0):
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        if n_step:  # the replay buffer's shared-frame layout
            obs = rng.integers(0, 256, (batch_size, obs_shape[0] + n_step, *obs_shape[1:]), dtype=np.uint8)
            next_obs = rng.integers(1, n_step + 1, batch_size)
        elif obs_dtype == np.uint8:
            obs = rng.integers(0, 256, (batch_size, *obs_shape), dtype=np.uint8)
            next_obs = rng.integers(0, 256, (batch_size, *obs_shape), dtype=np.uint8)
        else:
            obs = rng.normal(size=(batch_size, *obs_shape)).astype(np.float32)
            next_obs = rng.normal(size=(batch_size, *obs_shape)).astype(np.float32)
        batch = {"frames" if n_step else "obs": obs, "actions": rng.integers(0, num_actions, batch_size),
                 "rewards": rng.normal(size=batch_size).astype(np.float32),
                 "next_offset" if n_step else "next_obs": next_obs,
                 "discounts": rng.choice([0.0, 0.99], size=batch_size).astype(np.float32),
                 "weights": rng.uniform(0.2, 1.0, batch_size).astype(np.float32)}
        # Pinned host tensors, as the prefetcher delivers them, exercise the asynchronous copy.
        batches.append({k: torch.from_numpy(v).pin_memory() for k, v in batch.items()})
    return batches


CUDA_CASES = {
    "nature-cnn": dict(obs_shape=(4, 84, 84), obs_dtype=np.uint8, batch_size=32, num_actions=6,
                       config=dict(double_dqn=True, prioritized=True, max_grad_norm=1.0, target_update_interval=4)),
    "nature-cnn-frames": dict(obs_shape=(4, 84, 84), obs_dtype=np.uint8, batch_size=32, num_actions=6, n_step=3,
                              config=dict(loss="mse", target_update_interval=2)),
    "mlp-soft": dict(obs_shape=(4,), obs_dtype=np.float32, batch_size=64, num_actions=2,
                     config=dict(optimizer="rmsprop", loss="mse", target_update_interval=1, tau=0.05, lr=1e-3)),
}


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("case", CUDA_CASES)
def test_graphed_update_matches_eager_on_cuda(case):
    """Before each update the eager learner takes the graphed one's state, so the two differ
    by one step's rounding (capturable vs plain Adam) only. Compared over many updates
    instead, Adam amplifies that rounding (and TF32 convolutions, torch's default on an H100,
    amplify it further) far past any tolerance that would still catch a wrong graph."""
    spec = CUDA_CASES[case]
    torch.manual_seed(0)
    net = build_q_network(spec["obs_shape"], spec["num_actions"]).cuda()
    learners = {graph: Learner(copy.deepcopy(net), obs_shape=spec["obs_shape"], obs_dtype=spec["obs_dtype"],
                               batch_size=spec["batch_size"], num_envs=8, device="cuda", cuda_graph=graph,
                               **spec["config"])
                for graph in (False, True)}
    eager, graphed = learners[False], learners[True]
    n_step = spec.get("n_step", 0)

    def check(batches):
        for i, batch in enumerate(batches):
            if i:
                eager.load_state_dict(graphed.state_dict())
            for learner in (graphed, eager):
                learner.update(batch)
            for module in ("q_network", "target_network"):
                assert_close(params(getattr(graphed, module)), params(getattr(eager, module)), atol=1e-6)
            torch.testing.assert_close(graphed.new_priorities, eager.new_priorities, atol=1e-5, rtol=1e-4)
            assert graphed.metrics()["loss"] == pytest.approx(eager.metrics()["loss"], rel=1e-4)

    # deterministic cuDNN: a non-deterministic weight gradient of a near-zero sign would
    # become a whole +-lr step in Adam's first update
    with torch.backends.cudnn.flags(enabled=True, deterministic=True, allow_tf32=True):
        check(cuda_batches(spec["obs_shape"], spec["obs_dtype"], spec["batch_size"], spec["num_actions"], 12, 0,
                           n_step))  # 3 warm-up steps, the capture, then replays
        assert graphed.frame_update_graph_captured if n_step else graphed.update_graph_captured
        # A checkpoint loaded after capture re-captures against the new optimizer state.
        graphed.load_state_dict(eager.state_dict())
        check(cuda_batches(spec["obs_shape"], spec["obs_dtype"], spec["batch_size"], spec["num_actions"], 6, 1,
                           n_step))
        assert graphed.frame_update_graph_captured if n_step else graphed.update_graph_captured


@cuda
@pytest.mark.cuda
def test_graphed_act_matches_eager_on_cuda():
    torch.manual_seed(0)
    net = build_q_network((4, 84, 84), 6).cuda()
    graphed, eager = (Learner(net, obs_shape=(4, 84, 84), obs_dtype=np.uint8, batch_size=32, num_envs=16,
                              device="cuda", cuda_graph=graph, seed=0) for graph in (True, False))
    rng = np.random.default_rng(0)
    for _ in range(6):  # warm-up, capture, replays
        obs = rng.integers(0, 256, (16, 4, 84, 84), dtype=np.uint8)
        actions = graphed.act(obs, 0.0).cpu()
        with torch.no_grad():
            expected = net(torch.from_numpy(obs).cuda()).argmax(dim=1).cpu()
        assert torch.equal(actions, expected)
        eager.act(obs, 0.0)  # the same draws as graphed's
    assert graphed.act_graph_captured
    for _ in range(20):  # the same host draws reach the replayed graph and the eager step
        assert torch.equal(graphed.act(obs, 0.5).cpu(), eager.act(obs, 0.5).cpu())
    counts = torch.zeros(6, dtype=torch.int64)
    for _ in range(200):
        counts += torch.bincount(graphed.act(obs, 1.0).cpu(), minlength=6)
    # 3200 uniform draws over 6 actions: mean 533, sd 21; draws that never reached the graph
    # would put all in one bin.
    assert torch.all((counts - 3200 / 6).abs() < 130), counts


def test_optimizer_state_stuck_at_a_denormal_is_zeroed_every_sweep_interval():
    """A parameter whose gradient stays zero: Adam's moment planted at a denormal would only
    decay (0.9 a step), still denormal 32 steps later; the sweep sets it to 0."""
    from fastdqn.learner import DENORMAL_SWEEP_INTERVAL

    class WithUnusedParameter(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(OBS_DIM, NUM_ACTIONS)
            self.unused = torch.nn.Parameter(torch.ones(5))

        def forward(self, obs):
            return self.linear(obs)

    torch.manual_seed(0)
    learner = make_learner(WithUnusedParameter(), lr=1e-3)
    batch = make_batch(np.random.default_rng(0))
    learner.update(batch)
    denormal = torch.finfo(torch.float32).tiny / 1_000
    state = learner.optimizer.state[learner.q_network.unused]
    state["exp_avg"].fill_(denormal)
    for _ in range(DENORMAL_SWEEP_INTERVAL - 2):
        learner.update(batch)
    assert learner.num_updates == DENORMAL_SWEEP_INTERVAL - 1
    assert torch.all(state["exp_avg"] > 0)  # decayed, still denormal: no sweep yet
    linear_weight = learner.optimizer.state[learner.q_network.linear.weight]["exp_avg"].clone()
    learner.update(batch)
    assert torch.all(state["exp_avg"] == 0)
    linear_state = learner.optimizer.state[learner.q_network.linear.weight]["exp_avg"]
    assert linear_state.abs().max() > 1e-6 and not torch.equal(linear_state, linear_weight)  # Adam's, not swept


@pytest.mark.parametrize("optimizer", ["adam", "rmsprop"])
def test_optimizer_state_of_the_manual_path_is_ordinary_tensors(optimizer):
    """The manual MLP path updates in inference mode on CPU; the optimizer state its first
    step creates must still be ordinary tensors, which user code (or a sweep, or a loaded
    checkpoint) can change in place outside that mode."""
    learner = make_learner(make_net(), optimizer=optimizer)
    assert learner.manual_gradient
    learner.update(make_batch(np.random.default_rng(0)))
    tensors = [value for state in learner.optimizer.state.values() for value in state.values()
               if isinstance(value, torch.Tensor)]
    assert tensors
    for tensor in tensors:
        tensor.mul_(1.0)  # raises for an inference tensor outside inference mode


def batch_norm_net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(OBS_DIM, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Dropout(0.5), torch.nn.Linear(16, NUM_ACTIONS))


@pytest.mark.parametrize("tau, interval", [(1.0, 3), (0.25, 1)])
def test_a_users_batch_norm_and_dropout_train_in_train_mode_and_act_in_eval_mode(tau, interval):
    learner = make_learner(batch_norm_net(), tau=tau, target_update_interval=interval)
    online, target = learner.q_network, learner.target_network
    assert int(online[1].num_batches_tracked) == 0  # the learner's probe of the network left no statistics
    expected_mean, expected_var = target[1].running_mean.clone(), target[1].running_var.clone()
    rng = np.random.default_rng(0)
    obs = torch.as_tensor(rng.normal(size=(4, OBS_DIM)).astype(np.float32))
    for i in range(6):
        learner.update(make_batch(rng))
        assert online.training and not target.training
        if (i + 1) % interval == 0:  # the target follows the online statistics as it follows the weights
            expected_mean = expected_mean + tau * (online[1].running_mean - expected_mean)
            expected_var = expected_var + tau * (online[1].running_var - expected_var)
        torch.testing.assert_close(target[1].running_mean, expected_mean)
        torch.testing.assert_close(target[1].running_var, expected_var)
        # Acting: dropout off and the running statistics used, so the same observations give the same
        # Q-values, those of the network in eval mode, however many rows come at once.
        greedy = learner.act(obs, 0.0).clone()
        assert not online.training
        expected = copy.deepcopy(online).eval()(obs)
        torch.testing.assert_close(learner.q_values(obs), expected)
        torch.testing.assert_close(learner.q_values(obs[:1]), expected[:1])
        assert torch.equal(greedy, expected.argmax(dim=1))
    assert not torch.equal(target[1].running_mean, torch.zeros(16))


def test_submodules_the_user_froze_in_eval_mode_stay_frozen_while_the_rest_trains():
    network = batch_norm_net()
    network[1].eval()  # a frozen batch norm, as when fine-tuning a pretrained encoder
    frozen_mean, frozen_var = network[1].running_mean.clone(), network[1].running_var.clone()
    learner = make_learner(network)
    online = learner.q_network
    rng = np.random.default_rng(0)
    obs = torch.as_tensor(rng.normal(size=(4, OBS_DIM)).astype(np.float32))
    for _ in range(3):
        learner.update(make_batch(rng))
        assert online.training and online[3].training and not online[1].training
        learner.act(obs, 0.0)  # acting puts the whole network in eval mode; the next update restores both modes
        assert not online.training and not online[3].training
    assert int(online[1].num_batches_tracked) == 0
    assert torch.equal(online[1].running_mean, frozen_mean) and torch.equal(online[1].running_var, frozen_var)
    assert not torch.equal(online[0].weight, network[0].weight)  # it did train


def test_each_submodules_own_mode_comes_back_for_training():
    encoder = torch.nn.Sequential(torch.nn.Linear(OBS_DIM, 16), torch.nn.BatchNorm1d(16), torch.nn.Dropout(0.2))
    network = torch.nn.Sequential(encoder, torch.nn.ReLU(), torch.nn.Linear(16, NUM_ACTIONS))
    encoder.eval()
    encoder[2].train()  # a frozen encoder that keeps its dropout on
    learner = make_learner(network)
    online = learner.q_network
    rng = np.random.default_rng(0)
    obs = torch.as_tensor(rng.normal(size=(4, OBS_DIM)).astype(np.float32))
    learner.update(make_batch(rng))
    assert [m.training for m in online.modules()] == [True, False, False, False, True, True, True]
    online[2].eval()  # frozen by the user between two updates, after the learner was made
    for _ in range(2):
        learner.act(obs, 0.0)
        assert not any(m.training for m in online.modules())
        learner.update(make_batch(rng))
        assert [m.training for m in online.modules()] == [True, False, False, False, True, True, False]


class MaskedQ(torch.nn.Module):
    """Q-values with an additive action mask, a buffer holding -inf (an action never allowed)."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(OBS_DIM, NUM_ACTIONS)
        self.register_buffer("mask", torch.tensor([0.0] + [-math.inf] * (NUM_ACTIONS - 1)))

    def forward(self, obs):
        return self.body(obs) + self.mask


@pytest.mark.parametrize("tau, interval", [(1.0, 1), (0.5, 2)])
def test_buffers_that_are_not_running_statistics_stay_as_they_are(tau, interval):
    torch.manual_seed(0)
    learner = make_learner(MaskedQ(), tau=tau, target_update_interval=interval, double_dqn=True)
    rng = np.random.default_rng(0)
    for _ in range(4):
        batch = make_batch(rng)
        batch["actions"][:] = 0  # the only action the mask allows
        learner.update(batch)
    assert torch.equal(learner.target_network.mask, learner.q_network.mask)  # -inf is not lerped into NaN
    assert math.isfinite(learner.metrics()["loss"])

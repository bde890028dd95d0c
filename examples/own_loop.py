"""DQN on CartPole-v1 from fastdqn's pieces, for a training loop of your own: make_env's vector
envs, the replay buffer and the Learner's update step (a CUDA graph on a GPU). `fastdqn.DQN`
does all of this for you (and checkpoints, logs, evaluates, and runs faster); this is its core.

    python examples/own_loop.py [--steps 50000] [--prioritized] [--device cpu|cuda]
"""

import argparse

import numpy as np
import torch

from fastdqn import PrioritizedReplayBuffer, ReplayBuffer
from fastdqn.envs import make_env
from fastdqn.learner import Learner
from fastdqn.networks import build_q_network

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=50_000, help="environment steps, summed over the envs")
parser.add_argument("--prioritized", action="store_true", help="prioritized replay (Schaul et al. 2016)")
parser.add_argument("--device", default="cpu")
args = parser.parse_args()

NUM_ENVS, BATCH_SIZE, LEARNING_STARTS, TRAIN_EVERY, UPDATES = 8, 128, 1_000, 256, 32
torch.manual_seed(0)  # the network's initial weights
env = make_env("CartPole-v1", NUM_ENVS, seed=0)
Buffer = PrioritizedReplayBuffer if args.prioritized else ReplayBuffer
buffer = Buffer(100_000, env.obs_shape, num_envs=NUM_ENVS, obs_dtype=env.obs_dtype, n_step=3, gamma=0.99, seed=0)
network = build_q_network(env.obs_shape, env.num_actions, hidden_sizes=(128, 128))
learner = Learner(network, obs_shape=env.obs_shape, obs_dtype=env.obs_dtype, batch_size=BATCH_SIZE,
                  num_envs=NUM_ENVS, device=args.device, lr=2.3e-3, target_update_interval=64,
                  prioritized=args.prioritized, seed=0)
batch = buffer.empty_batch(BATCH_SIZE)  # sampled into at every update: no allocation
rng = np.random.default_rng(0)
obs, returns = env.reset(), []
for step in range(0, args.steps, NUM_ENVS):
    if step < LEARNING_STARTS:
        actions = rng.integers(env.num_actions, size=NUM_ENVS)
    else:
        actions = learner.act(obs, max(0.04, 1.0 - step / 8_000)).cpu().numpy()
    result = env.step(actions)
    stored = result.valid  # the step after an episode's end only resets its env: no transition
    buffer.add(obs[stored], actions[stored], result.rewards[stored], result.next_obs[stored],
               result.terminated[stored], result.truncated[stored], env_ids=result.env_ids[stored])
    returns += result.episode_returns.tolist()
    obs = result.obs
    if step >= LEARNING_STARTS and step % TRAIN_EVERY < NUM_ENVS:
        if args.prioritized:
            buffer.beta = 0.4 + 0.6 * step / args.steps  # importance weights annealed to 1
        for _ in range(UPDATES):
            buffer.sample(BATCH_SIZE, out=batch)
            learner.update(batch)
            if args.prioritized:
                buffer.update_priorities(batch.indices, learner.new_priorities.cpu().numpy())
    if (step + NUM_ENVS) % 10_000 < NUM_ENVS and returns:
        print(f"step {step + NUM_ENVS:,}: mean return of the last 20 episodes {np.mean(returns[-20:]):.1f}")

# Greedy evaluation: 10 whole episodes, one per env.
env = make_env("CartPole-v1", 10, seed=1, mode="eval")
obs, scores = env.reset(), {}
while len(scores) < 10:
    result = env.step(learner.act(obs, 0.0).cpu().numpy())
    for env_id, score in zip(result.episode_env_ids, result.episode_returns):
        scores.setdefault(int(env_id), float(score))
    obs = result.obs
print(f"evaluation: mean return {np.mean(list(scores.values())):.1f} over 10 episodes")

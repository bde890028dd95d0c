"""keras-rl's classic CartPole DQN tutorial, step for step in fastdqn.

Each keras-rl line of the tutorial is quoted above its fastdqn counterpart. Same settings:
one hidden layer of 16 units, a 50,000-transition memory, epsilon-greedy with epsilon 0.1,
10 warm-up steps, a soft target update of 1e-2 after every update, Adam with learning rate
1e-3, 5,000 training steps, then 5 greedy test episodes.

    python examples/keras_rl_cartpole.py
"""

import numpy as np

from fastdqn import DQN, DQNConfig

# ENV_NAME = 'CartPole-v0'
# env = gym.make(ENV_NAME); np.random.seed(123); env.seed(123)
ENV_NAME = "CartPole-v0"
SEED = 123

config = DQNConfig(
    seed=SEED,
    num_envs=1,  # keras-rl steps a single env
    # model = Sequential([Flatten(input_shape=(1,) + env.observation_space.shape),
    #                     Dense(16), Activation('relu'), Dense(nb_actions), Activation('linear')])
    hidden_sizes=(16,),
    # memory = SequentialMemory(limit=50000, window_length=1)
    buffer_size=50_000,
    # policy = EpsGreedyQPolicy(eps=.1)   (a constant epsilon)
    start_epsilon=0.1,
    end_epsilon=0.1,
    # DQNAgent(..., nb_steps_warmup=10, ...)
    learning_starts=10,
    # DQNAgent(..., target_model_update=1e-2, ...)   (< 1 means a soft update after every step)
    tau=1e-2,
    target_update_interval=1,
    # dqn.compile(Adam(lr=1e-3), metrics=['mae'])
    optimizer="adam",
    learning_rate=1e-3,
    # keras-rl's DQNAgent defaults: batch_size=32, gamma=.99, train_interval=1, delta_clip=inf (plain
    # squared error), one-step targets, no gradient clipping, no double DQN, no dueling.
    batch_size=32,
    gamma=0.99,
    n_step=1,
    train_frequency=1,
    gradient_steps=1,
    loss="mse",
    max_grad_norm=0.0,
    # dqn.fit(env, nb_steps=5000, visualize=False, verbose=2)
    total_steps=5_000,
    log_interval=500,
    eval_episodes=0,  # testing is the separate step below, as in the tutorial
)

dqn = DQN(ENV_NAME, config)  # writes runs/<run name>/: config.json, metrics.csv, TensorBoard events
dqn.learn(5_000)

# dqn.save_weights('dqn_{}_weights.h5f'.format(ENV_NAME), overwrite=True)
dqn.save(dqn.run_dir / f"dqn_{ENV_NAME}_weights.pt")

# dqn.test(env, nb_episodes=5, visualize=True)    (keras-rl tests with the greedy policy)
result = dqn.evaluate(5, epsilon=0.0, seed=SEED)
for episode, episode_return in enumerate(result["returns"], 1):
    print(f"Episode {episode}: reward: {episode_return:.1f}")
print(f"mean return over {result['episodes']} episodes: {np.mean(result['returns']):.1f}")

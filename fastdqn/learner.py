"""The DQN learner: one gradient step per call, captured as a CUDA graph on the GPU.

The whole step (online and target forward passes, TD target, loss, backward, gradient
clipping, optimizer step, target-network update, new priorities and metric sums) is one
function over static device tensors. On CPU, or with ``cuda_graph=False``, it runs eagerly;
on CUDA it is run eagerly for a few warm-up calls, then captured once into a
``torch.cuda.CUDAGraph`` and replayed. Both paths execute the same code but in two places:
the graph's target update is a lerp whose weight is 0 or tau, counted on the device, where
the eager step asks the host's count whether one is due (the CPU tests run both); and on CPU
Adam is fused (``_fused_adam_step``, tested against a textbook Adam), where a graph runs the
capturable one (tested against eager CUDA by the parity tests).

Graph safety rules kept throughout: no ``.item()`` or other host syncs in the step, no
data-dependent Python branches, gradients are preallocated and written in place, inputs are
copied into static tensors (on CPU, where nothing is captured, the step reads the caller's
batch directly), and the optimizer is capturable. The only wait is for a batch's own copy out
of pinned host memory, after the step is queued (see ``Learner._copy_inputs``). Exploration's
random numbers are drawn on the host (``Learner.act_rng``, as CleanRL and SB3 draw them) and
copied in with the observations, so the action graph holds no device RNG state that another
thread's graph replays could touch.
"""

from __future__ import annotations

import copy
import gc
import math
import warnings
import weakref
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fastdqn import manual_mlp
from fastdqn.networks import MLP, NatureCNN, check_obs_shape

__all__ = ["GRAPH_WARMUP_CALLS", "Learner", "network_tensors"]

_BATCH_FIELDS = ("obs", "actions", "rewards", "next_obs", "discounts")
_FRAME_BATCH_FIELDS = ("frames", "next_offset", "actions", "rewards", "discounts")


GRAPH_WARMUP_CALLS = 3
"""Eager calls of a graphed step before its capture: the capture is the next call."""

MAX_HOST_BATCHES = 64
"""Sets of host arrays whose tensors update() keeps (see _cpu_batch): the agent's batch, or
the batches of a stretch of updates whose targets were computed together."""

DENORMAL_SWEEP_INTERVAL = 32
"""Updates on CPU between two sweeps that set the optimizer's denormal state to zero.

A gradient that stays zero (a dead ReLU unit's weights) makes Adam's first moment decay by
beta1 each step into the denormal range, where it sticks: 0.9 times the smallest denormal
rounds back to it (the second moment does the same by beta2, later). x86 CPUs compute on
denormal operands ~100x slower: in a one-off profile of a CartPole run the fused Adam step
took 126 µs instead of 22, and in two pairs of runs a run took 10% longer than with the
denormals flushed. Such a value (< 1.2e-38) moves no weight, so the sweep sets it to 0.
Flushing denormals in the CPU's float mode instead (torch.set_flush_denormal) reaches only
the calling thread, not torch's worker threads, so what a run computes would depend on
which thread ran what."""


def _torch_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return torch.from_numpy(np.zeros(0, dtype=np.dtype(dtype))).dtype
    except TypeError as error:
        raise TypeError(f"obs_dtype must be a numpy or torch dtype, got {dtype!r}") from error


def _field_getter(batch):
    """name -> the batch's field or None, for a mapping or an object with attributes."""
    if isinstance(batch, Mapping):
        return batch.get
    return lambda name: getattr(batch, name, None)


def _running_statistics(module: torch.nn.Module) -> list[torch.Tensor]:
    """The running means and variances of a network's normalization layers (batch norm's), in module order."""
    statistics = (getattr(m, name, None) for m in module.modules() for name in ("running_mean", "running_var"))
    return [stat for stat in statistics if isinstance(stat, torch.Tensor)]


def network_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """A network's parameters and buffers, detached: what a copy of it must hold to act alike."""
    return [t.detach() for t in module.parameters()] + [t.detach() for t in module.buffers()]


class _GraphedStep:
    """Calls ``fn`` eagerly for the first ``warmup_calls`` calls, then as a CUDA graph.

    Warm-up runs on a side stream, as CUDA graph capture requires, so that lazy
    initialisation (cuBLAS handles, cuDNN algorithm choice, optimizer state) happens before
    capture. Every call, warm-up or replay, is a real step. ``fn`` must read and write only
    tensors whose storage outlives the graph.
    """

    def __init__(self, fn, warmup_calls: int = GRAPH_WARMUP_CALLS):
        self.fn = fn
        self.warmup_left = warmup_calls
        self.graph: torch.cuda.CUDAGraph | None = None
        self._stream: torch.cuda.Stream | None = None  # one side stream for warm-up and capture

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
            return
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        if self.warmup_left > 0:
            self.warmup_left -= 1
            self._stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self._stream):
                self.fn()
            torch.cuda.current_stream().wait_stream(self._stream)
            return
        graph = torch.cuda.CUDAGraph()
        # cuBLAS caches its workspace per handle and stream. Cleared before capture, the graph
        # allocates its own in its private pool; cleared after, eager work does not inherit
        # that one. Otherwise destroying another graph captured on the same stream can free a
        # workspace this graph still uses (pytorch#193402). torch.compile's CUDA graphs do the same.
        torch._C._cuda_clearCublasWorkspaces()
        # No garbage collection while capturing: a dead learner (learners sit in reference
        # cycles) whose graph the collector destroyed mid-capture would invalidate this
        # capture ("operation not permitted when stream is capturing", pytorch#161037;
        # torch.cuda.graph does not guard against it in torch 2.11).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            # thread_local: the actor and the learner may live in different threads (the async
            # pipeline); only this thread's work must stay capture-safe while capturing.
            with torch.cuda.graph(graph, stream=self._stream, capture_error_mode="thread_local"):
                self.fn()
        finally:
            if gc_was_enabled:
                gc.enable()
        torch._C._cuda_clearCublasWorkspaces()
        self.graph = graph
        graph.replay()


class Learner:
    """Owns the online and target Q-networks and the optimizer, and trains them.

    Args:
        q_network: maps observations (N, *obs_shape) to Q-values (N, num_actions). The
            learner moves it to ``device`` and trains it in place.
        obs_shape, obs_dtype: shape and dtype of one observation as stored in the replay
            buffer (uint8 frames stay uint8 until the network casts them on the device).
        batch_size: transitions per update (the static batch of the update graph).
        num_envs: observations per ``act`` call (the static batch of the action graph).
        device: where the networks live.
        lr, optimizer ("adam" or "rmsprop"), adam_eps: the optimizer. RMSprop uses
            rmsprop_alpha, rmsprop_eps and rmsprop_centered (Nature DQN: 0.95, 0.01, centered).
        loss: "huber" (smooth L1 with delta 1, as in SB3 and Dopamine) or "mse" (CleanRL).
        double_dqn: the online network picks the next action, the target network rates it.
        target_update_interval, tau: after every update whose count is a multiple of the
            interval, target <- target + tau * (online - target). tau=1 is a hard copy every
            interval updates; interval=1 with a small tau is a soft (Polyak) update.
        max_grad_norm: clip the global gradient norm to this; None disables clipping.
        prioritized: weight each transition's loss by the batch's importance weights.
        cuda_graph: "auto" (on for CUDA devices), True or False.
        actor_copy: if True, ``act`` uses a separate copy of the online network that only
            changes on ``sync_actor()``, so an actor thread never reads half-updated weights.
        seed: seeds ``act_rng``, the numpy generator of act's exploration draws (None: fresh
            entropy). It is part of ``state_dict``, so a restored learner explores on exactly.
    """

    def __init__(self, q_network: nn.Module, *, obs_shape: Sequence[int], obs_dtype, batch_size: int,
                 num_envs: int, device, lr: float = 1e-4, optimizer: str = "adam", adam_eps: float = 1e-8,
                 rmsprop_alpha: float = 0.95, rmsprop_eps: float = 0.01, rmsprop_centered: bool = True,
                 loss: str = "huber", double_dqn: bool = False, target_update_interval: int = 1000,
                 tau: float = 1.0, max_grad_norm: float | None = 10.0, prioritized: bool = False,
                 cuda_graph: bool | str = "auto", actor_copy: bool = False, seed: int | None = None):
        if not isinstance(q_network, nn.Module):
            raise TypeError(f"q_network must be a torch.nn.Module, got {type(q_network).__name__}")
        obs_shape = check_obs_shape(obs_shape)
        for name, value in (("batch_size", batch_size), ("num_envs", num_envs),
                            ("target_update_interval", target_update_interval)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        if optimizer not in ("adam", "rmsprop"):
            raise ValueError(f"optimizer must be 'adam' or 'rmsprop', got {optimizer!r}")
        if loss not in ("huber", "mse"):
            raise ValueError(f"loss must be 'huber' or 'mse', got {loss!r}")
        if not (isinstance(tau, (int, float)) and 0 < tau <= 1):
            raise ValueError(f"tau must be in (0, 1], got {tau!r}")
        if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number or None, got {max_grad_norm!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if cuda_graph not in ("auto", True, False):
            raise ValueError(f"cuda_graph must be 'auto', True or False, got {cuda_graph!r}")
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if cuda_graph is True and device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs a CUDA device, got device={str(device)!r}")

        self.device = device
        self.obs_shape = obs_shape
        self.obs_dtype = _torch_dtype(obs_dtype)
        self.batch_size = batch_size
        self.num_envs = num_envs
        self.loss = loss
        self.double_dqn = bool(double_dqn)
        self.target_update_interval = target_update_interval
        self.tau = float(tau)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.prioritized = bool(prioritized)
        self.cuda_graph = device.type == "cuda" and cuda_graph in ("auto", True)

        self.q_network = q_network.to(device)
        # Training puts back each submodule's own mode, as it was before acting switched them all
        # to eval: one the user froze (a pretrained encoder's batch norm) stays in eval mode. A
        # network handed over in eval mode as a whole trains as a whole.
        self._train_modes = {m: m.training for m in q_network.modules()} if q_network.training else None
        try:
            with torch.no_grad():  # in eval mode: batch norm's running statistics do not see the probe
                probe = self.q_network.eval()(torch.zeros((2, *obs_shape), dtype=self.obs_dtype, device=device))
            self._train_mode()
        except RuntimeError as error:
            raise ValueError(f"q_network must map (N, *obs_shape) observations with obs_shape={obs_shape} to "
                             f"Q-values (N, num_actions), but it failed on such a batch: {error}") from error
        if probe.dim() != 2 or probe.shape[0] != 2 or not probe.is_floating_point():
            raise ValueError("q_network must map (N, *obs_shape) observations to float Q-values (N, num_actions), "
                             f"got output of shape {tuple(probe.shape)} and dtype {probe.dtype}")
        self.num_actions = probe.shape[1]
        # The online network trains in train mode and acts in eval mode (dropout off, batch norm on
        # its running statistics); the target network and the actor's copy only ever infer. The
        # target follows the online network's running statistics as it follows its parameters
        # (no other buffer: a mask holding -inf would lerp to NaN).
        self.target_network = copy.deepcopy(self.q_network).requires_grad_(False).eval()
        self._online_tensors = [*self.q_network.parameters(), *_running_statistics(self.q_network)]
        self._target_tensors = [*self.target_network.parameters(), *_running_statistics(self.target_network)]
        # fastdqn's own networks have no layer that minds the mode: they are never switched.
        self._switches_mode = type(self.q_network) not in (MLP, NatureCNN)
        self.actor_network = (copy.deepcopy(self.q_network).requires_grad_(False).eval() if actor_copy
                              else self.q_network)

        self._params = [p for p in self.q_network.parameters() if p.requires_grad]
        if not self._params:
            raise ValueError("q_network has no trainable parameters")
        dtypes = {p.dtype for p in self._params}
        if len(dtypes) > 1:
            raise ValueError(f"q_network's trainable parameters must share one dtype, got {sorted(map(str, dtypes))}")
        # Gradients live outside any graph's memory pool and are written in place each step,
        # so the graphed and the eager step do exactly the same thing. They are views of one
        # flat buffer: norm, clipping and zeroing are one op each (autograd accumulates into
        # existing .grad tensors in place).
        self._flat_grad = torch.zeros(sum(p.numel() for p in self._params), dtype=dtypes.pop(), device=device)
        self._grads = list(torch.split(self._flat_grad, [p.numel() for p in self._params]))
        for i, p in enumerate(self._params):
            p.grad = self._grads[i] = self._grads[i].view_as(p)
        # fastdqn's own MLP skips autograd and module calls (see fastdqn.manual_mlp).
        manual = manual_mlp.supports(self.q_network)
        self._td_gradient = (manual_mlp.MLPTDGradient(self.q_network, self.target_network, batch_size, loss=loss,
                                                      double_dqn=self.double_dqn)
                             if manual else self._autograd_td_gradient)
        self._act_q_values = manual_mlp.MLPForward(self.actor_network, num_envs) if manual else self.actor_network
        # Updates and acting need no autograd, but only the manual MLP path is free of it:
        # there, on CPU, inference mode skips autograd's dispatch on every op, and the
        # temporaries it creates are inference tensors, without version counters or view
        # metadata: 9% of a CartPole update. The inference tensors that persist (_host_batches,
        # MLPForward.input, target_values' results) are used only inside update and act. CUDA
        # keeps no_grad: graph replays have no per-op cost, and eager CUDA with inference mode
        # is unmeasured.
        self._no_autograd = torch.inference_mode if manual and device.type == "cpu" else torch.no_grad
        # The capturable optimizers keep their step count on the device; plain eager CUDA keeps
        # the faster default path, which is what "eager PyTorch" means in the benchmarks. On CPU
        # the fused Adam kernel saves most of the optimizer's per-tensor overhead.
        if optimizer == "adam":
            fused = {"fused": True} if device.type == "cpu" else {}
            self.optimizer = torch.optim.Adam(self._params, lr=lr, eps=adam_eps, capturable=self.cuda_graph, **fused)
        else:
            self.optimizer = torch.optim.RMSprop(self._params, lr=lr, alpha=rmsprop_alpha, eps=rmsprop_eps,
                                                 centered=rmsprop_centered, capturable=self.cuda_graph,
                                                 foreach=device.type == "cpu" or None)
        # How this device runs the optimizer; a loaded state (maybe saved on another device) keeps them.
        self._optimizer_flags = {key: self.optimizer.param_groups[0][key] for key in ("capturable", "fused", "foreach")
                                 if key in self.optimizer.param_groups[0]}
        # Warm-up steps run outside capture by design; silence torch's once-only advice about it.
        self.optimizer._warned_capturable_if_run_uncaptured = True
        self._optimizer_step = self._fused_adam_step if optimizer == "adam" and device.type == "cpu" \
            else self.optimizer.step
        self._adam_tensors: list[list[torch.Tensor]] | None = None

        def zeros(*shape, dtype=torch.float32):
            return torch.zeros(shape, dtype=dtype, device=device)

        # Static inputs of the update step.
        self._obs = zeros(batch_size, *obs_shape, dtype=self.obs_dtype)
        self._actions = zeros(batch_size, dtype=torch.int64)
        self._rewards = zeros(batch_size)
        self._next_obs = zeros(batch_size, *obs_shape, dtype=self.obs_dtype)
        self._discounts = zeros(batch_size)
        self._weights = torch.ones(batch_size, device=device)
        # Static state and outputs of the update step.
        self._update_count = zeros(dtype=torch.int64)
        self._tau = torch.tensor(self.tau, device=device)
        self.new_priorities = zeros(batch_size)
        self._loss_sum = zeros()
        self._q_sum = zeros()
        self._grad_norm_sum = zeros()
        self._metric_updates = 0
        self.num_updates = 0
        # Static input and output of action selection. Every act draws two uniform numbers per
        # observation on the host, whatever epsilon is: one decides whether to explore, the
        # other picks the random action (pinned on CUDA, so the copy is asynchronous; on CPU
        # the step reads them where they are).
        self.act_rng = np.random.default_rng(seed)
        self._act_obs = zeros(num_envs, *obs_shape, dtype=self.obs_dtype)
        self._act_draws = zeros(2, num_envs)
        self._act_draws_host = (self._act_draws if device.type == "cpu"
                                else torch.empty(2, num_envs, pin_memory=device.type == "cuda"))
        self._act_draws_numpy = self._act_draws_host.numpy()
        self._act_draw_rows = tuple(self._act_draws)
        self._epsilon = zeros()
        self._act_out = zeros(num_envs, dtype=torch.int64)

        # The shared-frame layout (the replay buffer's FrameBatch) gets its static frames and its
        # own graph on first use, once its frame count is known.
        self._frames: torch.Tensor | None = None
        self._next_offset = zeros(batch_size, dtype=torch.int64)

        self._host_batches: dict[int, tuple[list, dict]] = {}  # see _cpu_batch
        self._seen_once: dict[int, weakref.ref] = {}
        self._target_forwards: dict[int, manual_mlp.MLPForward] = {}  # see target_values
        self._static_batch = {"obs": self._obs, "actions": self._actions, "rewards": self._rewards,
                              "next_obs": self._next_obs, "discounts": self._discounts, "weights": self._weights}
        self._graph_steps()
        self._act_step = self._graphed(lambda: self._act_on(self._act_obs))

    def _graph_steps(self) -> None:
        """The update steps over the static batch tensors (graphed on CUDA)."""
        self._update_step = self._graphed(lambda: self._train_step(self._static_batch))
        self._frame_update_step = self._graphed(lambda: self._train_step_on_frames(self._static_batch))

    def _graphed(self, step):
        return _GraphedStep(step) if self.cuda_graph else step

    # ------------------------------------------------------------------ the update
    def update(self, batch, next_q: torch.Tensor | None = None) -> None:
        """One gradient step on ``batch``; asynchronous on CUDA (returns before it finishes).

        ``batch`` is a mapping or an object (such as the replay buffer's Batch) with fields
        obs, actions, rewards, next_obs, discounts and, for prioritized replay, weights, as
        numpy arrays or torch tensors on the host (pinned memory makes the copy asynchronous)
        or on the device. The TD target is rewards + discounts * Q_target(next_obs, a*),
        with discounts = gamma**n, or 0 where the episode terminated.

        The shared-frame layout (the buffer's FrameBatch: frames and next_offset in place of
        obs and next_obs) is accepted too; it moves k + n frames per sample to the device
        instead of 2k, and the observations are unpacked there.

        ``next_q`` (CPU, observation batches, no Double DQN): ``target_values(next_obs)`` of
        this batch, computed ahead for several batches in one forward pass while the target
        network stays as it is. The step is then the same as without it.

        Prioritized replay: afterwards ``new_priorities`` (batch_size,) on the device holds the
        batch's |TD errors|, for ``buffer.update_priorities(batch.indices,
        learner.new_priorities.cpu().numpy())``. Observations must come in the learner's
        obs_dtype and actions as integers in [0, num_actions): a TypeError or ValueError naming
        the field otherwise, before anything changes. (Checked when the learner first meets a
        batch's arrays: arrays sampled into again are not checked again, nor are the values of
        actions already on the device, which would cost a sync.)
        """
        field = _field_getter(batch)
        frame_layout = field("frames") is not None
        if next_q is not None and (self.device.type != "cpu" or self.double_dqn or frame_layout):
            raise ValueError("next_q is for CPU updates of observation batches (not frames) without Double DQN")
        if next_q is not None and tuple(next_q.shape) != (self.batch_size,):
            raise ValueError(f"next_q must have shape ({self.batch_size},), got {tuple(next_q.shape)}")
        names = (_FRAME_BATCH_FIELDS if frame_layout else _BATCH_FIELDS) + (("weights",) if self.prioritized else ())
        values = [field(name) for name in names]
        self._online_mode(training=True)
        with self._no_autograd():  # the autograd path turns grad mode on where it needs it
            if self.device.type == "cpu" and frame_layout:  # nothing to stage: the step reads the batch where it is
                self._train_step_on_frames(self._cpu_batch(names, values))
            elif self.device.type == "cpu":
                self._train_step(self._cpu_batch(names, values), next_q)
            else:
                sources = self._checked_batch(names, values)
                self._copy_inputs([(getattr(self, "_" + name), value) for name, value in sources.items()],
                                  then=self._frame_update_step if frame_layout else self._update_step)
            self.num_updates += 1
            self._metric_updates += 1
            if self.device.type == "cpu" and self.num_updates % DENORMAL_SWEEP_INTERVAL == 0:
                self._zero_denormal_state()

    def _zero_denormal_state(self) -> None:
        """Sets the optimizer state's denormal values (see DENORMAL_SWEEP_INTERVAL) to zero."""
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if key != "step" and value.is_floating_point():
                    value.masked_fill_(value.abs() < torch.finfo(value.dtype).tiny, 0.0)

    def _checked_batch(self, names, values) -> dict[str, torch.Tensor]:
        """The batch's fields as tensors, after checking that each is there with its static shape."""
        if "frames" in names and self._frames is None:
            if values[0] is None:
                raise ValueError("batch is missing field 'frames'")
            self._allocate_frames(torch.as_tensor(values[0]).shape)
        sources = {}
        for name, value in zip(names, values):
            if value is None:
                raise ValueError(f"batch is missing field {name!r}"
                                 + (" (prioritized=True needs importance weights)" if name == "weights" else ""))
            value = torch.as_tensor(value)
            expected = getattr(self, "_" + name).shape
            if value.shape != expected:
                raise ValueError(f"batch.{name} must have shape {tuple(expected)}, got {tuple(value.shape)}")
            self._check_dtype(f"batch.{name}", value, name)
            if name == "actions" and value.device.type == "cpu" and len(value):  # (on the device it would sync)
                low, high = (int(v) for v in torch.aminmax(value.to(torch.int64)))  # (no kernel for uint16-64)
                if low < 0 or high >= self.num_actions:
                    raise ValueError(f"batch.actions must be in [0, {self.num_actions}), got {low}..{high}")
            sources[name] = value
        return sources

    def _check_dtype(self, name: str, value: torch.Tensor, field: str) -> None:
        """Observations in the learner's obs_dtype (a cast would change them: floats truncated
        to uint8, uint8 pixels made floats that the Nature CNN does not scale), integer actions
        and offsets, floating-point rewards, discounts and weights."""
        if field in ("obs", "next_obs", "frames"):
            if value.dtype != self.obs_dtype:
                raise TypeError(f"{name} must have dtype {self.obs_dtype} (the learner's obs_dtype), got {value.dtype}")
        elif field in ("actions", "next_offset"):
            if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
                raise TypeError(f"{name} must hold integers, got {value.dtype}")
        elif not value.dtype.is_floating_point:
            raise TypeError(f"{name} must be floating point, got {value.dtype}")

    def _cpu_batch(self, names, values) -> dict[str, torch.Tensor]:
        """The batch as CPU tensors of the step's dtypes. A caller that samples into the same
        arrays each time (as the agent does, into a few sets of them) gets the tensors made the
        first time back: they share the arrays' memory, so they hold the new batch without any
        conversion. Arrays are kept only once they come a second time: fresh ones each update
        (``buffer.sample(n)``) are let go."""
        key = id(values[0])
        seen, tensors = self._host_batches.get(key, ((), None))
        if len(seen) == len(values) and all(a is b for a, b in zip(seen, values)):
            return tensors
        sources = self._checked_batch(names, values)
        tensors = {name: value.to(self.device, getattr(self, "_" + name).dtype) for name, value in sources.items()}
        if all(tensors[name] is value for name, value in sources.items()) \
                and all(isinstance(value, (np.ndarray, torch.Tensor)) for value in values):
            first_sight = self._seen_once.get(key)
            if first_sight is not None and first_sight() is values[0]:
                if len(self._host_batches) >= MAX_HOST_BATCHES:
                    self._host_batches.clear()
                self._host_batches[key] = (values, tensors)
            else:
                if len(self._seen_once) >= MAX_HOST_BATCHES:
                    self._seen_once.clear()
                self._seen_once[key] = weakref.ref(values[0])
        return tensors

    def _allocate_frames(self, shape) -> None:
        """Static frames for the shared-frame layout, shaped by the first such batch."""
        shape, k = tuple(shape), self.obs_shape[0]
        if len(self.obs_shape) < 2 or len(shape) != len(self.obs_shape) + 1 or shape[0] != self.batch_size \
                or shape[1] <= k or shape[2:] != self.obs_shape[1:]:
            raise ValueError(f"batch.frames must have shape ({self.batch_size}, {k} + n_step, "
                             f"*{self.obs_shape[1:]}) for frame-stacked observations {self.obs_shape}, got {shape}")
        self._frames = torch.zeros(shape, dtype=self.obs_dtype, device=self.device)
        self._static_batch.update(frames=self._frames, next_offset=self._next_offset)

    def _train_step_on_frames(self, batch: dict) -> None:
        """obs = frames[:, :k], next_obs = frames[:, next_offset : next_offset + k], unpacked
        on the device into the static obs tensors, then the update."""
        frames, k = batch["frames"], self.obs_shape[0]
        self._obs.copy_(frames[:, :k])
        # Whole frames picked by index_select from all samples' frames in a row: on a CPU 16x
        # faster than torch.gather, which reads an index per byte.
        width = frames.shape[1]
        first = torch.arange(self.batch_size, device=self.device) * width + batch["next_offset"]
        rows = (first[:, None] + torch.arange(k, device=self.device)).view(-1)
        torch.index_select(frames.flatten(0, 1), 0, rows, out=self._next_obs.view(-1, *self.obs_shape[1:]))
        self._train_step({**batch, "obs": self._obs, "next_obs": self._next_obs})

    def _copy_inputs(self, pairs, then) -> None:
        """Copy host or device tensors into static device tensors, then call ``then()``.

        Copies from pinned host memory are asynchronous. Once ``then``'s work is queued behind
        them we wait for the copies (not for ``then``) to land, so the caller may refill its
        pinned buffer as soon as we return, while the device stays busy. The wait also keeps
        the host at most one step ahead of the device. Pageable memory is staged at once.
        """
        for static, value in pairs:
            static.copy_(value, non_blocking=True)
        copied = None
        if self.device.type == "cuda" and any(value.is_pinned() for _, value in pairs):
            copied = torch.cuda.Event()
            copied.record()
        then()
        if copied is not None:
            copied.synchronize()

    def _train_step(self, batch: dict, next_q: torch.Tensor | None = None) -> None:
        q_taken, td_error, loss = self._td_gradient(
            batch["obs"], batch["actions"], batch["rewards"], batch["next_obs"], batch["discounts"],
            batch["weights"] if self.prioritized else None, next_q)
        grad_norm = torch.linalg.vector_norm(self._flat_grad)
        if self.max_grad_norm is not None:  # as torch.nn.utils.clip_grad_norm_, without its overhead
            # max_norm / (norm + eps) as torch computes it (reciprocal, then product), without
            # the Python-level __rtruediv__ that a scalar divided by a tensor goes through.
            self._flat_grad.mul_((grad_norm + 1e-6).reciprocal_().mul_(self.max_grad_norm).clamp_(max=1.0))
        if self.optimizer.state:
            self._optimizer_step()
        else:  # the first step creates the optimizer's state: as ordinary tensors, which
            with torch.inference_mode(False):  # checkpoints and sweeps may touch in any mode
                self.optimizer.step()
        self._update_count.add_(1)
        if self.cuda_graph:  # branch-free inside the graph: a lerp of weight tau when due, else 0
            weight = self._tau * (self._update_count % self.target_update_interval == 0)
            self._lerp_target([weight] * len(self._target_tensors))
        elif (self.num_updates + 1) % self.target_update_interval == 0:  # eager: the host knows the count
            self._lerp_target(self.tau)
        torch.abs(td_error, out=self.new_priorities)
        self._loss_sum.add_(loss)
        self._q_sum.add_(q_taken.sum())  # divided by the batch size in metrics()
        self._grad_norm_sum.add_(grad_norm)

    def _fused_adam_step(self) -> None:
        """``Adam(fused=True).step()`` on CPU without its per-call Python overhead, which for
        a small MLP costs several times the kernel itself: the same two calls torch's step
        makes, on the optimizer's own state, so its state_dict (and checkpoints) are the same."""
        if self._adam_tensors is None:
            states = [self.optimizer.state[p] for p in self._params]
            # All parameters step together, so they share one step count: one increment a step.
            step = states[0]["step"]
            for state in states:
                state["step"] = step
            self._adam_tensors = [self._params, self._grads, *([s[key] for s in states]
                                                               for key in ("exp_avg", "exp_avg_sq", "step"))]
        params, grads, exp_avgs, exp_avg_sqs, steps = self._adam_tensors
        group = self.optimizer.param_groups[0]
        beta1, beta2 = group["betas"]
        steps[0].add_(1)
        torch._fused_adam_(params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, lr=group["lr"],
                           beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                           maximize=False)

    def _autograd_td_gradient(self, obs, actions, rewards, next_obs, discounts, weights, next_q=None):
        """Fills the online network's gradients with the TD loss's; returns (Q(s, a) of the
        batch actions, TD error, loss). Works for any network (manual_mlp has the MLP's)."""
        self._flat_grad.zero_()
        with torch.enable_grad():
            q_values = self.q_network(obs)
            q_taken = q_values.gather(1, actions.unsqueeze(1)).squeeze(1)
            with torch.no_grad():
                if next_q is None:  # else computed ahead (target_values)
                    next_target_q = self.target_network(next_obs)
                    chooser = self.q_network(next_obs) if self.double_dqn else next_target_q
                    next_actions = chooser.argmax(dim=1, keepdim=True)
                    next_q = next_target_q.gather(1, next_actions).squeeze(1)
                td_target = rewards + discounts * next_q
            if self.loss == "huber":
                losses = F.smooth_l1_loss(q_taken, td_target, reduction="none", beta=1.0)
            else:
                losses = F.mse_loss(q_taken, td_target, reduction="none")
            loss = (losses * weights).mean() if weights is not None else losses.mean()
            loss.backward()
        q_taken = q_taken.detach()
        return q_taken, q_taken - td_target, loss.detach()

    def target_values(self, next_obs) -> torch.Tensor:
        """max_a Q_target(next_obs, a) for any number of observations (CPU): the bootstrap term
        of several updates' TD targets in one forward pass, for ``update(..., next_q=)``. Valid
        until the target network next changes, after an update that completes a
        ``target_update_interval``."""
        next_obs = torch.as_tensor(next_obs)
        with self._no_autograd():
            if not self.manual_gradient:
                return self.target_network(next_obs.to(self.obs_dtype)).amax(dim=1)
            rows = len(next_obs)
            if rows not in self._target_forwards:  # buffers for this many rows, made once
                self._target_forwards[rows] = manual_mlp.MLPForward(self.target_network, rows)
            return self._target_forwards[rows](next_obs).amax(dim=1)

    def _lerp_target(self, weight) -> None:
        torch._foreach_lerp_(self._target_tensors, self._online_tensors, weight)

    def metrics(self) -> dict:
        """Means of loss, Q(s, a) of the batch actions and gradient norm (before clipping)
        over the updates since the last call, and the total update count. Syncs the device."""
        sums = torch.stack([self._loss_sum, self._q_sum, self._grad_norm_sum]).tolist()
        count = self._metric_updates
        for tensor in (self._loss_sum, self._q_sum, self._grad_norm_sum):
            tensor.zero_()
        self._metric_updates = 0
        sums[1] /= self.batch_size
        loss, q_mean, grad_norm = (s / count if count else math.nan for s in sums)
        return {"loss": loss, "q_mean": q_mean, "grad_norm": grad_norm, "updates": self.num_updates}

    # ------------------------------------------------------------------ acting
    def act(self, obs, epsilon) -> torch.Tensor:
        """Epsilon-greedy actions (N,) int64 on the device, for observations (N, *obs_shape).

        With N == num_envs this runs the static (graphed on CUDA) path and returns a static
        tensor that the next ``act`` call overwrites: copy it (e.g. ``.cpu()``) before then.
        Other N run eagerly. ``epsilon`` is a float or a 0-d tensor.
        """
        obs = self._checked_obs(obs)
        if isinstance(epsilon, torch.Tensor):
            self._epsilon.copy_(epsilon, non_blocking=True)
        elif isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.floating, np.integer)):
            raise TypeError(f"epsilon must be a number or a 0-d tensor, got {type(epsilon).__name__}")
        else:
            self._epsilon.fill_(float(epsilon))
        if self.actor_network is self.q_network:  # (a copy stays in eval mode; the online one may be training)
            self._online_mode(training=False)
        if obs.shape[0] != self.num_envs:
            draws = torch.from_numpy(self.act_rng.random((2, len(obs)), dtype=np.float32))
            with torch.no_grad():
                q_values = self.actor_network(obs.to(self.device, self.obs_dtype, non_blocking=True))
            return self._epsilon_greedy(q_values, *draws.to(self.device))
        self.act_rng.random(out=self._act_draws_numpy, dtype=np.float32)
        if self.device.type == "cpu":  # nothing to stage
            return self._act_on(obs.to(self.device, self.obs_dtype))
        self._copy_inputs([(self._act_obs, obs), (self._act_draws, self._act_draws_host)], then=self._act_step)
        return self._act_out

    @property
    def manual_gradient(self) -> bool:
        """Whether updates and acting skip autograd through ``fastdqn.manual_mlp`` (fastdqn's
        plain MLP) rather than calling the network as a module (any other network)."""
        return isinstance(self._td_gradient, manual_mlp.MLPTDGradient)

    @property
    def update_graph_captured(self) -> bool:
        """Whether ``update`` with observation batches replays a captured CUDA graph yet (it
        runs eagerly for a few warm-up calls first). Always False without CUDA graphs."""
        return isinstance(self._update_step, _GraphedStep) and self._update_step.graph is not None

    @property
    def frame_update_graph_captured(self) -> bool:
        """``update_graph_captured`` for batches in the shared-frame layout, which have a graph of their own."""
        return isinstance(self._frame_update_step, _GraphedStep) and self._frame_update_step.graph is not None

    @property
    def act_graph_captured(self) -> bool:
        """Whether ``act`` for num_envs observations replays a captured CUDA graph yet (it
        runs eagerly for a few warm-up calls first). Always False without CUDA graphs."""
        return isinstance(self._act_step, _GraphedStep) and self._act_step.graph is not None

    @torch.no_grad()
    def q_values(self, obs) -> torch.Tensor:
        """The online network's Q-values (N, num_actions) on the device, in eval mode, for
        observations (N, *obs_shape) in obs_dtype (numpy, or torch on any device)."""
        obs = self._checked_obs(obs)
        self._online_mode(training=False)
        return self.q_network(obs.to(self.device, non_blocking=True))

    def _checked_obs(self, obs) -> torch.Tensor:
        obs = torch.as_tensor(obs)
        if obs.shape[1:] != self.obs_shape:
            raise ValueError(f"obs must have shape (N, *{self.obs_shape}), got {tuple(obs.shape)}")
        self._check_dtype("obs", obs, "obs")
        return obs

    def _online_mode(self, training: bool) -> None:
        """Switches a user's online network between train and eval mode when that changes."""
        if self._switches_mode and self.q_network.training != training:
            if training:
                self._train_mode()
            else:
                self._train_modes = {m: m.training for m in self.q_network.modules()}
                self.q_network.eval()

    def _train_mode(self) -> None:
        if self._train_modes is None:
            self.q_network.train()
        else:
            for module, training in self._train_modes.items():
                module.training = training

    def _act_on(self, obs: torch.Tensor) -> torch.Tensor:
        with self._no_autograd():
            return self._act_out.copy_(self._epsilon_greedy(self._act_q_values(obs), *self._act_draw_rows))

    def _epsilon_greedy(self, q_values: torch.Tensor, explore_draws: torch.Tensor,
                        action_draws: torch.Tensor) -> torch.Tensor:
        """Draws uniform in [0, 1): explore where explore_draws < epsilon, with the action
        floor(action_draws * num_actions) (below num_actions, as float32 rounds the product)."""
        random_actions = action_draws.mul(self.num_actions).long()
        return torch.where(explore_draws < self._epsilon, random_actions, q_values.argmax(dim=1))

    @torch.no_grad()
    def sync_actor(self) -> None:
        """Copy the online weights into the actor's network (with actor_copy=True), in place
        and on the current stream, so a captured action graph stays valid."""
        if self.actor_network is self.q_network:
            return
        torch._foreach_copy_(network_tensors(self.actor_network), network_tensors(self.q_network))

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Networks, optimizer, update count and act_rng's state; tensors and plain values
        only, so ``torch.load(..., weights_only=True)`` reads it back."""
        return {
            "q_network": self.q_network.state_dict(),
            "target_network": self.target_network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "num_updates": torch.tensor(self.num_updates, dtype=torch.int64),
            "act_rng": self.act_rng.bit_generator.state,
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"q_network", "target_network", "optimizer", "num_updates"} - set(state)
        if missing:
            raise ValueError(f"learner state is missing {sorted(missing)}")
        saved, ours = _optimizer_kind(state["optimizer"]), type(self.optimizer).__name__
        if saved != ours:
            raise ValueError(f"the saved optimizer state is {saved}'s; this learner's optimizer is {ours}")
        # Network weights are copied in place, so the captured graphs keep pointing at them.
        try:
            self.q_network.load_state_dict(state["q_network"])
        except RuntimeError as e:  # torch's message lists every missing and unexpected key, a line each
            details = "; ".join(line.strip().rstrip(".") for line in str(e).splitlines()[1:] if line.strip())
            raise ValueError(f"the saved q_network does not fit this one: {details or e}") from e
        self.target_network.load_state_dict(state["target_network"])
        # A deep copy: torch's loader keeps tensors that already sit on the right device, which
        # would share optimizer moments with whoever handed us this state.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        for group in self.optimizer.param_groups:
            group.update(self._optimizer_flags)
        for param_state in self.optimizer.state.values():
            if "step" in param_state:
                step_device = self.device if self.cuda_graph else "cpu"
                param_state["step"] = param_state["step"].to(step_device, torch.float32)
        self._adam_tensors = None  # the optimizer's state tensors were replaced
        if "act_rng" in state:
            self.act_rng.bit_generator.state = state["act_rng"]
        else:
            warnings.warn("this learner state has no act_rng (saved by an earlier fastdqn): exploration "
                          "goes on with this learner's own draws, not those the saved run would have made",
                          stacklevel=2)
        self.num_updates = int(state["num_updates"])
        self._update_count.fill_(self.num_updates)
        self.sync_actor()
        # The optimizer's state tensors were replaced: capture the update step again.
        self._graph_steps()


def _optimizer_kind(state: dict) -> str:
    """Which optimizer saved ``state`` (a torch optimizer state_dict): "Adam", "RMSprop" or "unknown"."""
    groups = (state.get("param_groups") if isinstance(state, dict) else None) or [{}]
    return "Adam" if "betas" in groups[0] else "RMSprop" if "alpha" in groups[0] else "unknown"

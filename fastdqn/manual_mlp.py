"""fastdqn's MLP forward pass and TD-loss gradient, written out by hand.

An eager update of a small MLP spends most of its time in overhead, not arithmetic: on a
2-core CPU the autograd graph, the module calls and the temporaries of one CartPole update
cost more than its matrix products. These classes compute the same Q-values, loss and
parameter gradients with matrix products written into buffers allocated once, and build
no autograd graph. They use only branch-free tensor ops, so a CUDA graph captures them as
it captures the autograd step.

They apply to a plain ``MLP`` (ReLU hidden layers, a linear head, no dueling head) whose
parameters all train; ``supports`` says which networks those are. Other networks, users'
own included, go through autograd and module calls. The learner's tests check both paths
against the same textbook DQN.
"""

from __future__ import annotations

import torch
from torch import nn

from fastdqn.networks import MLP

__all__ = ["MLPForward", "MLPTDGradient", "supports"]

_relu_backward = torch.ops.aten.threshold_backward.grad_input


def supports(network: nn.Module) -> bool:
    """True for a plain fastdqn MLP whose parameters all train."""
    return (type(network) is MLP and type(network.head) is nn.Linear
            and all(type(layer) in (nn.Linear, nn.ReLU) for layer in network.body)
            and all(p.requires_grad for p in network.parameters()))


class MLPForward:
    """Q-values of an MLP for a fixed batch size, each layer's output written into its own
    buffer; the last input (flattened, float) and the hidden activations stay for a backward
    pass."""

    def __init__(self, network: MLP, batch_size: int):
        if type(network) is not MLP or type(network.head) is not nn.Linear:
            raise TypeError("MLPForward needs a plain fastdqn MLP (no dueling head)")
        self.layers = [layer for layer in network.body if isinstance(layer, nn.Linear)] + [network.head]
        # Detached views share the parameters' memory, so optimizer steps and load_state_dict
        # show through, but stand outside autograd: the out= products need no no_grad scope.
        self.weights = [layer.weight.detach() for layer in self.layers]
        self._transposed_weights = [weight.t() for weight in self.weights]
        self._biases = [layer.bias.detach() for layer in self.layers]
        device = self.weights[0].device
        self.outputs = [torch.empty(batch_size, layer.out_features, device=device) for layer in self.layers]
        self.input: torch.Tensor | None = None

    def __call__(self, obs: torch.Tensor) -> torch.Tensor:
        """Q-values (batch_size, num_actions) for ``obs``, which must not require grad."""
        x = self.input = obs.flatten(1).float()
        for bias, weight_t, out in zip(self._biases, self._transposed_weights, self.outputs):
            torch.addmm(bias, x, weight_t, out=out)
            if out is not self.outputs[-1]:
                out.relu_()  # in place: the backward pass needs only its output
            x = out
        return x


class MLPTDGradient:
    """Fills the online MLP's ``.grad`` tensors (in place) with the gradient of the TD loss.

    It writes into the ``.grad`` tensors the parameters have when it is built (zeros are
    created where there are none) and builds no autograd graph.

    Calling it with the batch's tensors returns ``(q_taken, td_error, loss)``: Q(s, a) of
    the batch actions, Q(s, a) - TD target, and the mean loss, the same values the autograd
    step computes. The loss is Huber (smooth L1, delta 1) or the squared error, averaged
    over the batch, each transition weighted by its importance weight when ``weights`` is
    given.
    """

    def __init__(self, online: MLP, target: MLP, batch_size: int, *, loss: str, double_dqn: bool):
        if not supports(online):
            raise TypeError("MLPTDGradient needs a plain fastdqn MLP whose parameters all train")
        self.loss, self.double_dqn = loss, double_dqn
        self.online = MLPForward(online, batch_size)  # over obs; its activations feed the backward pass
        self.target = MLPForward(target, batch_size)
        self.chooser = MLPForward(online, batch_size) if double_dqn else None  # online over next_obs
        widths = [out.shape[1] for out in self.online.outputs]
        device = self.online.outputs[0].device
        self._grad_hidden = [torch.empty(batch_size, width, device=device) for width in widths[:-1]]
        self._grad_q = torch.zeros(batch_size, widths[-1], device=device)
        for layer in self.online.layers:
            for param in (layer.weight, layer.bias):
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
        self._weight_grads = [layer.weight.grad for layer in self.online.layers]
        self._bias_grads = [layer.bias.grad for layer in self.online.layers]

    def __call__(self, obs, actions, rewards, next_obs, discounts, weights=None, next_q=None):
        q_values = self.online(obs)
        if next_q is None:  # else max_a Q_target(next_obs, a), computed ahead (Learner.target_values)
            next_target_q = self.target(next_obs)
            if self.double_dqn:
                next_actions = self.chooser(next_obs).argmax(dim=1, keepdim=True)
                next_q = next_target_q.gather(1, next_actions).squeeze(1)
            else:
                next_q = next_target_q.amax(dim=1)
        td_target = torch.addcmul(rewards, discounts, next_q)
        taken = actions.unsqueeze(1)
        q_taken = q_values.gather(1, taken).squeeze(1)
        td_error = q_taken - td_target
        # Each transition's loss is grad_taken * loss_per_grad, grad_taken being the loss's
        # derivative in q_taken: huber(e) = clamp(e) * (e - clamp(e) / 2), e**2 = 2e * (e / 2).
        # Scaling grad_taken by weight / batch size first makes their dot product the mean loss.
        if self.loss == "huber":
            grad_taken = td_error.clamp(-1.0, 1.0)
            loss_per_grad = torch.sub(td_error, grad_taken, alpha=0.5)
        else:
            grad_taken = td_error * 2.0
            loss_per_grad = td_error * 0.5
        if weights is None:
            grad_taken.div_(len(q_taken))
        else:
            grad_taken.mul_(weights).div_(len(q_taken))
        loss = torch.dot(grad_taken, loss_per_grad)
        self._grad_q.zero_().scatter_(1, taken, grad_taken.unsqueeze(1))
        self._backward()
        return q_taken, td_error, loss

    def _backward(self) -> None:
        activations = self.online.outputs
        grad = self._grad_q
        for i in reversed(range(len(activations))):
            inputs = activations[i - 1] if i else self.online.input
            torch.mm(grad.t(), inputs, out=self._weight_grads[i])
            torch.sum(grad, dim=0, out=self._bias_grads[i])
            if i:
                grad_hidden = torch.mm(grad, self.online.weights[i], out=self._grad_hidden[i - 1])
                # ReLU's backward, as autograd computes it (zero where the output was zero), in place.
                grad = _relu_backward(grad_hidden, inputs, 0.0, grad_input=grad_hidden)

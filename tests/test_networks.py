"""Q-networks: output shapes, the dueling combination, input scaling, the factory."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from fastdqn.networks import MLP, DuelingHead, NatureCNN, build_q_network


@pytest.mark.parametrize("dueling", [False, True])
def test_mlp_maps_flattened_observations_to_one_q_value_per_action(dueling):
    torch.manual_seed(0)
    net = MLP(6, 5, hidden_sizes=(16, 8), dueling=dueling)
    obs = torch.randn(7, 2, 3)
    q = net(obs)
    assert q.shape == (7, 5) and q.dtype == torch.float32
    assert torch.allclose(q, net(obs.reshape(7, 6)))


def test_mlp_layers_follow_hidden_sizes_and_cast_integer_input():
    net = MLP(4, 3, hidden_sizes=(120, 84))
    widths = [(m.in_features, m.out_features) for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert widths == [(4, 120), (120, 84), (84, 3)]
    obs = torch.tensor([[1, 2, 3, 4]], dtype=torch.int64)
    assert torch.allclose(net(obs), net(obs.float()))


def test_mlp_without_hidden_layers_is_linear():
    torch.manual_seed(1)
    net = MLP(3, 2, hidden_sizes=())
    obs = torch.randn(4, 3)
    assert torch.allclose(net(obs), obs @ net.head.weight.T + net.head.bias)


def test_dueling_head_is_value_plus_centred_advantage():
    torch.manual_seed(2)
    net = MLP(4, 3, hidden_sizes=(8,), dueling=True)
    obs = torch.randn(5, 4)
    hidden = torch.relu(obs @ net.body[0].weight.T + net.body[0].bias)
    value = hidden @ net.head.value.weight.T + net.head.value.bias            # (5, 1)
    advantage = hidden @ net.head.advantage.weight.T + net.head.advantage.bias  # (5, 3)
    expected = torch.empty(5, 3)
    for i in range(5):
        mean_advantage = sum(advantage[i, a] for a in range(3)) / 3
        for a in range(3):
            expected[i, a] = value[i, 0] + advantage[i, a] - mean_advantage
    assert torch.allclose(net(obs), expected, atol=1e-6)
    # Centred advantages: the mean Q over actions is V(s).
    assert torch.allclose(net(obs).mean(dim=1), value[:, 0], atol=1e-6)


@pytest.mark.parametrize("dueling", [False, True])
def test_nature_cnn_scales_uint8_frames_and_matches_the_paper_layout(dueling):
    torch.manual_seed(3)
    net = NatureCNN(4, 6, dueling=dueling)
    frames = torch.randint(0, 256, (2, 4, 84, 84), dtype=torch.uint8)
    q = net(frames)
    assert q.shape == (2, 6)
    # By hand: three convolutions (32x8x8/4, 64x4x4/2, 64x3x3/1) on pixels / 255, then 3136 -> 512.
    convs = [m for m in net.body if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == [
        (32, (8, 8), (4, 4)), (64, (4, 4), (2, 2)), (64, (3, 3), (1, 1))]
    x = frames.to(torch.float32) / 255.0
    for conv in convs:
        x = torch.relu(F.conv2d(x, conv.weight, conv.bias, stride=conv.stride))
    features = x.reshape(2, -1)
    assert features.shape == (2, 3136)
    assert torch.allclose(net.head(features), q, atol=1e-5)


def test_nature_cnn_scales_integer_pixels_and_takes_float_frames_as_they_are():
    torch.manual_seed(0)
    net = NatureCNN(2, 3, input_size=(40, 40))
    pixels = torch.randint(0, 256, (2, 2, 40, 40), dtype=torch.uint8)
    scaled = pixels.to(torch.float32) / 255.0
    torch.testing.assert_close(net(scaled), net(pixels))
    torch.testing.assert_close(net(scaled.double()), net(pixels))
    torch.testing.assert_close(net(pixels.long()), net(pixels))


def test_nature_cnn_adapts_its_linear_layer_to_other_frame_sizes():
    net = NatureCNN(1, 2, input_size=(64, 48))
    assert net(torch.zeros(3, 1, 64, 48, dtype=torch.uint8)).shape == (3, 2)
    with pytest.raises(ValueError, match="too small"):
        NatureCNN(1, 2, input_size=(30, 30))


def test_dueling_head_module_combines_any_two_streams():
    head = DuelingHead(torch.nn.Identity(), torch.nn.Identity())
    features = torch.tensor([[1.0, 3.0]])  # V = [1, 3] broadcast per action, A = [1, 3], mean A = 2
    assert torch.equal(head(features), torch.tensor([[0.0, 4.0]]))


def test_build_q_network_picks_cnn_for_images_and_mlp_otherwise():
    cnn = build_q_network((4, 84, 84), 6, dueling=True)
    assert isinstance(cnn, NatureCNN) and isinstance(cnn.head, DuelingHead)
    mlp = build_q_network((4,), 2, hidden_sizes=(16,))
    assert isinstance(mlp, MLP) and mlp(torch.zeros(1, 4)).shape == (1, 2)
    flat = build_q_network((2, 5), 3)
    assert isinstance(flat, MLP) and flat.obs_dim == 10
    assert isinstance(build_q_network(np.array([4, 84, 84]), 6), NatureCNN)  # numpy's ints, as a gym space's shape


@pytest.mark.parametrize("call, match", [
    (lambda: build_q_network((), 2), "obs_shape"),
    (lambda: build_q_network((4, 0), 2), "obs_shape"),
    (lambda: build_q_network((4,), 0), "num_actions"),
    (lambda: MLP(4, 2, hidden_sizes=(8, -1)), "hidden_sizes"),
    (lambda: NatureCNN(0, 2), "in_channels"),
    (lambda: MLP(2.5, 2), "obs_dim"),
    (lambda: build_q_network((2, 3, 4), 4), r"too small for the Nature CNN.*FlattenObservation"),
    (lambda: build_q_network((84, 84, 3), 4), r"channels-first \(C, H, W\).*; \(84, 84, 3\) looks channels-last"),
])
def test_bad_arguments_raise_value_errors_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()

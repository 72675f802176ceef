"""models.MaxPool2x2 and ReLUMaxPool2x2 must give F.max_pool2d(x, 2)'s numbers bit for bit: outputs, gradients (the
winner of a tie is the first maximum in scan order) and second derivatives (the privacy attacks
differentiate through gradients). ReLUMaxPool2x2's C code also with NaNs and signed zeros, in float32
and bfloat16; MaxPool2x2 on inputs without them (models.py states its two edge cases)."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

import kernels
import models
from models import max_pool_2x2


def tied_input(shape, dtype=torch.float32):
    """ReLU'd noise (zeros tie everywhere) with hand-made positive ties in the first windows."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(*shape, dtype=dtype))
    x[0, 0, 0:2, 0:2] = 1.0                        # all four corners tie: upper left wins
    x[0, 0, 0:2, 2:4] = torch.tensor([[0.5, 2.0], [2.0, 2.0]])   # upper right wins a three-way tie
    x[0, 0, 2:4, 0:2] = torch.tensor([[0.5, 0.5], [3.0, 3.0]])   # lower left wins the lower tie
    x[0, 0, 2:4, 2:4] = torch.tensor([[-1.0, -2.0], [-3.0, -1.0]])  # negatives: upper left ties lower right
    return x


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 6, 24, 24), (3, 2, 4, 6)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_outputs_and_gradients_equal_max_pool2d(shape, dtype):
    x = tied_input(shape, dtype)
    grad_out = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2, dtype=dtype)
    results = []
    for pool in (lambda t: F.max_pool2d(t, 2), max_pool_2x2):
        leaf = x.clone().requires_grad_()
        out = pool(leaf)
        out.backward(grad_out)
        results.append((out.detach(), leaf.grad))
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[1][1][0, 0, 0, 0] == grad_out[0, 0, 0, 0] and results[1][1][0, 0, 0, 1] == 0


def test_odd_sizes_and_channels_last_fall_back_to_max_pool2d():
    x = torch.randn(2, 3, 7, 9)
    assert torch.equal(max_pool_2x2(x), F.max_pool2d(x, 2))
    y = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    assert torch.equal(max_pool_2x2(y), F.max_pool2d(y, 2))


def test_second_derivatives_equal_max_pool2d():
    """Gradient matching (DLG, IG) backpropagates through a weight gradient: d/dx of ||dL/dw||^2."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(1, 4, 3)
    images = torch.randn(2, 1, 10, 10)
    results = []
    for pool in (lambda t: F.max_pool2d(t, 2), max_pool_2x2):
        x = images.clone().requires_grad_()
        loss = pool(torch.relu(conv(x))).square().sum()
        weight_grad, = torch.autograd.grad(loss, conv.weight, create_graph=True)
        image_grad, = torch.autograd.grad(weight_grad.square().sum(), x)
        results.append(image_grad)
    assert torch.equal(results[0], results[1])


def test_a_simplecnn_step_equals_one_with_nn_maxpool2d():
    torch.manual_seed(2)
    fast = models.build_model("simplecnn-mnist", 10)
    plain = models.build_model("simplecnn-mnist", 10)
    plain.load_state_dict(fast.state_dict())
    plain.base.relu_pool = torch.nn.Sequential(torch.nn.ReLU(), torch.nn.MaxPool2d(2, 2))
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for model in (fast, plain):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))


# ReLUMaxPool2x2: relu then 2x2 max pooling in one pass of C (kernels.relu_max_pool_2x2), with
# PyTorch's numbers: outputs, gradients, ties, NaN, signed zeros, second derivatives.

def raw_input_with_edge_cases(shape):
    """Noise (half negative: relu zeros tie) with ties, NaNs and signed zeros in the first windows."""
    torch.manual_seed(3)
    x = torch.randn(*shape)
    x[0, 0, 0:2, 0:2] = torch.tensor([[-0.0, -1.0], [0.0, -2.0]])            # relu: -0 ties +0: -0 wins
    x[0, 0, 0:2, 2:4] = torch.tensor([[float("nan"), 5.0], [float("nan"), 1.0]])  # the last NaN wins
    x[0, 0, 2:4, 0:2] = torch.tensor([[0.5, 2.0], [2.0, 2.0]])              # upper right wins a three-way tie
    x[0, 0, 2:4, 2:4] = torch.tensor([[0.5, 0.5], [3.0, 3.0]])              # lower left wins the lower tie
    return x


def relu_pool_results(pool, x, grad_out):
    leaf = x.clone().requires_grad_()
    out = pool(leaf)
    out.backward(grad_out)
    return out.detach(), leaf.grad


def same_bits(a, b):
    integers = torch.int16 if a.dtype == torch.bfloat16 else torch.int32
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(integers), b.view(integers))


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (2, 6, 24, 24), (3, 2, 4, 6), (64, 16, 8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_pool_equals_relu_then_max_pool2d_bit_for_bit(shape, dtype):
    """bfloat16 (FedHUG's synthesis under autocast) too: its NaNs come out as PyTorch's relu makes them."""
    x = raw_input_with_edge_cases(shape).to(dtype)
    grad_out = torch.randn(shape[0], shape[1], shape[2] // 2, shape[3] // 2).to(dtype)
    grad_out[0, 0, 1, 1] = -0.0                       # 0 + (-0) is +0 in PyTorch's pooling backward
    plain = relu_pool_results(lambda t: F.max_pool2d(torch.relu(t), 2), x, grad_out)
    fused = relu_pool_results(models.ReLUMaxPool2x2(), x, grad_out)
    assert same_bits(plain[0], fused[0]) and same_bits(plain[1], fused[1])
    assert torch.isnan(fused[0][0, 0, 0, 1]) and fused[1][0, 0, 1, 2] == grad_out[0, 0, 0, 1]


def test_the_c_pooling_gives_the_hand_winners():
    if models.relu_max_pool_2x2(torch.zeros(1, 1, 2, 2)) is None:
        pytest.skip("no C compiler: ReLUMaxPool2x2 runs torch.relu and MaxPool2x2")
    x = raw_input_with_edge_cases((1, 1, 4, 4))
    out, winner = kernels.c_relu_max_pool(x)
    assert winner.flatten().tolist() == [0, 2, 1, 2]
    assert torch.signbit(out[0, 0, 0, 0]) and out[0, 0, 1].tolist() == [2.0, 3.0]
    grad = kernels.c_relu_max_pool_backward(torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]), out, winner, x.shape)
    assert grad[0, 0].tolist() == [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0],     # relu output -0: no gradient
                                   [0.0, 3.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0]]


def test_the_c_pooling_serves_bfloat16_and_a_bf16_synthesis_step_keeps_its_numbers():
    """Under bfloat16 autocast the pooling gets bfloat16 activations: the C code takes them, and the
    input gradient of a SimpleCNN (what synthesis follows) equals the one PyTorch's ops give."""
    if models.relu_max_pool_2x2(torch.zeros(1, 1, 2, 2)) is None:
        pytest.skip("no C compiler: ReLUMaxPool2x2 runs torch.relu and MaxPool2x2")
    assert models.relu_max_pool_2x2(torch.zeros(1, 1, 2, 2, dtype=torch.bfloat16)) is not None
    torch.manual_seed(4)
    model = models.build_model("simplecnn-mnist", 10)
    images, labels = torch.randn(12, 1, 28, 28), torch.randint(0, 10, (12,))
    results = []
    for use_c in (True, False):
        x = images.clone().requires_grad_()
        with contextlib.nullcontext() if use_c else kernels.disabled(), torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), labels)
            results.append(torch.autograd.grad(loss, x)[0])
    assert torch.equal(results[0], results[1]) and results[0].abs().sum() > 0


def test_relu_pool_second_derivatives_equal_plain():
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(1, 4, 3)
    images = torch.randn(2, 1, 10, 10)
    results = []
    for pool in (lambda t: F.max_pool2d(torch.relu(t), 2), models.ReLUMaxPool2x2()):
        x = images.clone().requires_grad_()
        loss = pool(conv(x)).square().sum()
        weight_grad, = torch.autograd.grad(loss, conv.weight, create_graph=True)
        image_grad, = torch.autograd.grad(weight_grad.square().sum(), x)
        results.append(image_grad)
    assert torch.equal(results[0], results[1])


def test_relu_pool_falls_back_where_c_cannot_run():
    pool = models.ReLUMaxPool2x2()
    for x in (torch.randn(2, 3, 7, 9), torch.randn(2, 3, 8, 8, dtype=torch.float64),
              torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)):
        assert models.relu_max_pool_2x2(x) is None
        assert torch.equal(pool(x), F.max_pool2d(torch.relu(x), 2))
    x = torch.randn(2, 3, 8, 8)
    with kernels.disabled():
        assert models.relu_max_pool_2x2(x) is None
        assert torch.equal(pool(x), F.max_pool2d(torch.relu(x), 2))

"""models.MaxPool2x2 must give F.max_pool2d(x, 2)'s numbers bit for bit: outputs, gradients (the
winner of a tie is the first maximum in scan order) and second derivatives (the privacy attacks
differentiate through gradients)."""
import pytest
import torch
import torch.nn.functional as F

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
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
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
    plain.base.pool = torch.nn.MaxPool2d(2, 2)
    images, labels = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    for model in (fast, plain):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))

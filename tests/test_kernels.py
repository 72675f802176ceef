"""kernels.py: the C chains against their formulas, and FastConv2d against nn.Conv2d, bit for
bit (on a CPU whose oneDNN sums in another order it must fall back, so the equalities hold on every
machine)."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import kernels
import models
import synthesis

needs_c = pytest.mark.skipif(kernels.library() is None, reason="no C compiler: kernels.py falls back to oneDNN")


def fma_chain(pairs, start=0.0):
    """float32 acc = fma(a, b, acc) over the pairs in order, from `start` (a * b exact in float64)."""
    acc = np.float32(start)
    for a, b in pairs:
        acc = np.float32(np.float64(a) * np.float64(b) + np.float64(acc))
    return acc


def tiny(seed, n=2, size=8, k=3, out_channels=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, size, size, generator=g)
    weight = torch.randn(out_channels, 1, k, k, generator=g)
    grad = torch.randn(n, out_channels, size - k + 1, size - k + 1, generator=g)
    return x, weight, grad


def computed(result):
    """A C function's result; the test is skipped where the C code cannot run (it returned None)."""
    if result is None:
        pytest.skip("this CPU has no AVX2 and FMA: kernels.py falls back to oneDNN")
    return result


@needs_c
def test_weight_and_bias_gradients_are_the_documented_chains():
    x, weight, grad = tiny(0)
    dw, db = computed(kernels.c_weight_grad(grad, x, weight))
    n, out_channels, oh, ow = grad.shape
    order = [(b, y, x_) for b in range(n) for y in range(oh) for x_ in range(ow)]
    for o in range(out_channels):
        for i in range(3):
            for j in range(3):
                expected = fma_chain((x[b, 0, y + i, x_ + j].item(), grad[b, o, y, x_].item()) for b, y, x_ in order)
                assert dw[o, 0, i, j].item() == expected
        assert db[o].item() == fma_chain((grad[b, o, y, x_].item(), 1.0) for b, y, x_ in order)


@needs_c
def test_output_is_the_documented_chain():
    x, weight, _ = tiny(3, size=10, out_channels=4)     # rows of 8 outputs, 4 channels: a tile
    bias = torch.randn(4, generator=torch.Generator().manual_seed(8))
    out = computed(kernels.c_forward(x, weight, bias))
    for b in range(2):
        for o in range(4):
            for y in range(8):
                for x_ in range(8):
                    pairs = [(x[b, 0, y + i, x_ + j].item(), weight[o, 0, i, j].item()) for i in range(3) for j in range(3)]
                    assert out[b, o, y, x_].item() == fma_chain(pairs, start=bias[o].item())


@needs_c
def test_input_gradient_is_the_documented_chain():
    x, weight, grad = tiny(1)
    di = computed(kernels.c_input_grad(grad, x, weight))
    oh = grad.shape[2]
    for b in range(2):
        for h in range(8):
            for w in range(8):
                pairs = [(weight[o, 0, i, j].item(), grad[b, o, h - i, w - j].item())
                         for i in range(3) for j in range(3) for o in range(2)
                         if 0 <= h - i < oh and 0 <= w - j < oh]
                assert di[b, 0, h, w].item() == fma_chain(pairs)


def gradients(conv_class, x, seed, create_graph=False):
    torch.manual_seed(seed)
    conv = conv_class(x.shape[1], 6, 5)
    x = x.clone().requires_grad_()
    loss = models.max_pool_2x2(torch.relu(conv(x))).square().sum()
    grads = torch.autograd.grad(loss, [x, conv.weight, conv.bias], create_graph=create_graph)
    if create_graph:     # gradient matching (DLG, IG): d/dx of ||dL/dw||^2
        grads = torch.autograd.grad(grads[1].square().sum(), x)
    return grads


@pytest.mark.parametrize("shape", [(64, 1, 28, 28), (7, 1, 27, 27), (4, 3, 32, 32)])
def test_fast_backward_conv_equals_nn_conv2d(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    for _ in range(2):       # the first call of a shape checks against oneDNN, the second uses the verdict
        assert all(torch.equal(a, b) for a, b in zip(gradients(kernels.FastConv2d, x, 3),
                                                     gradients(torch.nn.Conv2d, x, 3)))
    assert all(torch.equal(a, b) for a, b in zip(gradients(kernels.FastConv2d, x, 3, create_graph=True),
                                                 gradients(torch.nn.Conv2d, x, 3, create_graph=True)))


@needs_c
def test_the_c_code_is_used_where_it_agrees_with_onednn():
    x = torch.randn(5, 1, 28, 28, generator=torch.Generator().manual_seed(4))
    gradients(kernels.FastConv2d, x, 5)
    verdict = kernels._agrees[("backward", (5, 1, 28, 28), (6, 1, 5, 5), (True, True, True), torch.get_num_threads())]
    verdict = verdict and kernels._agrees[("forward", (5, 1, 28, 28), (6, 1, 5, 5), torch.get_num_threads())]
    c_result = kernels.c_weight_grad(torch.ones(5, 6, 24, 24), x, torch.ones(6, 1, 5, 5))
    # where the C code runs (AVX2 and FMA) on a one-thread oneDNN AVX2 kernel, they must agree
    if c_result is not None and torch.get_num_threads() == 1 and torch.backends.cpu.get_cpu_capability() == "AVX2":
        assert verdict


@pytest.mark.parametrize("name", ["simplecnn-mnist", "fedavgcnn"])
def test_training_and_inversion_equal_the_plain_backward(name):
    torch.manual_seed(6)
    model = models.build_model(name, 10)
    assert isinstance(model.base.conv1, kernels.FastConv2d) or isinstance(model.base.conv1[0],
                                                                                  kernels.FastConv2d)
    images, labels = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))

    def train(net):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for _ in range(3):
            optimizer.zero_grad()
            F.cross_entropy(net(images), labels).backward()
            optimizer.step()
        return net

    def invert(teacher, student):
        terms = synthesis.InversionTerms(cross_entropy=1.0, entropy=0.5, margin=0.3)
        return synthesis.invert(teacher, student, torch.arange(10).repeat(3), (1, 28, 28),
                                torch.Generator().manual_seed(7), 4, 0.05, terms).inputs

    fast = train(copy.deepcopy(model))
    fast_inputs = invert(fast, model)
    with kernels.disabled():
        plain = train(copy.deepcopy(model))
        plain_inputs = invert(plain, model)
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    assert torch.equal(fast_inputs, plain_inputs)
    assert not torch.equal(fast_inputs, invert(fast, fast))     # the comparison can tell models apart


def test_without_a_c_compiler_it_is_nn_conv2d(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "COMPILE", ["no-such-compiler"])
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.library() is None
    x = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(9))
    assert all(torch.equal(a, b) for a, b in zip(gradients(kernels.FastConv2d, x, 3),
                                                 gradients(torch.nn.Conv2d, x, 3)))


def test_a_fresh_cache_compiles_the_c_code(monkeypatch, tmp_path):
    if kernels.library() is None:
        pytest.skip("no C compiler: kernels.py falls back to oneDNN")
    monkeypatch.setattr(kernels, "_library", None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert kernels.library() is not None
    assert [p.suffix for p in (tmp_path / "fl-suite-kernels").iterdir()] == [".so"]    # no temporary left behind

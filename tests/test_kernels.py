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


def fma_chains(steps, start):
    """Many float32 chains at once: acc = fma(a, b, acc) for each (a, b, valid) of `steps` in order,
    elementwise over arrays (a * b exact in float64), only where `valid` (None: everywhere)."""
    acc = np.asarray(start, dtype=np.float32)
    for a, b, valid in steps:
        step = (np.float64(a) * np.float64(b) + acc.astype(np.float64)).astype(np.float32)
        acc = step if valid is None else np.where(valid, step, acc)
    return acc


def several_channels(seed, n=10, channels=3, size=10, k=3, out_channels=16):
    """n = 10: not a multiple of the 8 samples the input-gradient chains hold in one vector."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, channels, size, size, generator=g).numpy(),
            torch.randn(out_channels, channels, k, k, generator=g).numpy(),
            torch.randn(n, out_channels, size - k + 1, size - k + 1, generator=g).numpy())


@needs_c
def test_several_channel_weight_and_bias_gradients_are_the_documented_chains():
    x, weight, grad = several_channels(10)
    n, out_channels, oh, ow = grad.shape
    k = weight.shape[2]
    dw, db = computed(kernels.c_weight_grad(*map(torch.from_numpy, (grad, x, weight))))
    order = [(b, y, x_) for b in range(n) for y in range(oh) for x_ in range(ow)]
    expected_dw = fma_chains(((x[b, None, :, y:y + k, x_:x_ + k], grad[b, :, y, x_, None, None, None], None)
                              for b, y, x_ in order), np.zeros(weight.shape))
    expected_db = fma_chains(((grad[b, :, y, x_], 1.0, None) for b, y, x_ in order), np.zeros(out_channels))
    assert np.array_equal(dw.numpy(), expected_dw) and np.array_equal(db.numpy(), expected_db)


@needs_c
def test_several_channel_input_gradient_is_the_documented_chain():
    x, weight, grad = several_channels(11)
    n, channels, size, _ = x.shape
    out_channels, _, k, _ = weight.shape
    oh = grad.shape[2]
    di = computed(kernels.c_input_grad(*map(torch.from_numpy, (grad, x, weight))))
    padded = np.zeros((n, out_channels, oh + 2 * k, oh + 2 * k), dtype=np.float32)
    padded[:, :, k:k + oh, k:k + oh] = grad                      # grad[.., h - i, w - j] = padded[.., k + h - i, ..]
    h = np.arange(size).reshape(size, 1)
    w = np.arange(size).reshape(1, size)
    steps = ((weight[o, None, :, i, j, None, None], padded[:, o, None, k - i:k - i + size, k - j:k - j + size],
              (h - i >= 0) & (h - i < oh) & (w - j >= 0) & (w - j < oh))
             for block in range(0, out_channels, 8) for i in range(k) for j in range(k)
             for o in range(block, block + 8))
    assert np.array_equal(di.numpy(), fma_chains(steps, np.zeros(x.shape)))


@needs_c
def test_several_channel_output_is_the_documented_chain():
    x, weight, _ = several_channels(12, n=2, out_channels=8)
    k = weight.shape[2]
    bias = torch.randn(8, generator=torch.Generator().manual_seed(13)).numpy()
    out = computed(kernels.c_forward(*map(torch.from_numpy, (x, weight, bias))))
    steps = ((x[:, None, c, i:i + 8, j:j + 8], weight[None, :, c, i, j, None, None], None)
             for i in range(k) for j in range(k) for c in range(x.shape[1]))
    assert np.array_equal(out.numpy(), fma_chains(steps, np.broadcast_to(bias[None, :, None, None], out.shape)))


def gradients(conv_class, x, seed, create_graph=False, out_channels=6):
    torch.manual_seed(seed)
    conv = conv_class(x.shape[1], out_channels, 5)
    x = x.clone().requires_grad_()
    loss = models.max_pool_2x2(torch.relu(conv(x))).square().sum()
    grads = torch.autograd.grad(loss, [x, conv.weight, conv.bias], create_graph=create_graph)
    if create_graph:     # gradient matching (DLG, IG): d/dx of ||dL/dw||^2
        grads = torch.autograd.grad(grads[1].square().sum(), x)
    return grads


@pytest.mark.parametrize("shape, out_channels", [((64, 1, 28, 28), 6), ((7, 1, 27, 27), 6), ((4, 3, 32, 32), 6),
                                                 ((64, 6, 12, 12), 16), ((13, 6, 12, 12), 16)])
def test_fast_conv_equals_nn_conv2d(shape, out_channels):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2))
    for _ in range(2):       # the first call of a shape checks against oneDNN, the second uses the verdict
        assert all(torch.equal(a, b) for a, b in zip(gradients(kernels.FastConv2d, x, 3, out_channels=out_channels),
                                                     gradients(torch.nn.Conv2d, x, 3, out_channels=out_channels)))
    assert all(torch.equal(a, b) for a, b in zip(
        gradients(kernels.FastConv2d, x, 3, create_graph=True, out_channels=out_channels),
        gradients(torch.nn.Conv2d, x, 3, create_graph=True, out_channels=out_channels)))


@needs_c
@pytest.mark.parametrize("shape, out_channels", [((5, 1, 28, 28), 6), ((5, 6, 12, 12), 16)])   # SimpleCNN's
def test_the_c_code_is_used_where_it_agrees_with_onednn(shape, out_channels):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4))
    gradients(kernels.FastConv2d, x, 5, out_channels=out_channels)
    weight_shape, threads = (out_channels, shape[1], 5, 5), torch.get_num_threads()
    verdict = kernels._agrees[("backward", shape, weight_shape, (True, True, True), threads)]
    verdict = verdict and kernels._agrees[("forward", shape, weight_shape, threads)]
    c_result = kernels.c_weight_grad(torch.ones(5, 6, 24, 24), torch.ones(5, 1, 28, 28), torch.ones(6, 1, 5, 5))
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

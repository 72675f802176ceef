"""FedKTL's server-side generator, substituted (spec/pfl-advanced.md section 6a).

FedKTL (CVPR'24) needs a *pre-trained* image generator on the server, in two places only:
G.mapping supplies the latent distribution W that the server aligns the clients' prototypes with
(MMD), and G.synthesis renders one image per class from the aligned latent centroid. The paper's
generators (StyleGAN-XL ImageNet-64, StyleGAN3, Stable Diffusion) cannot be obtained offline, so
this module builds the substitute the spec recommends, and its ablation:

    SUBSTITUTE  a small StyleGAN-like generator pre-trained by the server, once, as a GAN
                (non-saturating loss), on a public dataset of ANOTHER domain that ships inside a
                package: scikit-learn's bundled 8x8 handwritten digits (1,797 images, 0..16
                grey levels, the file sklearn.datasets.load_digits reads from the installed package,
                no download; scikit-learn must be installed), upsampled to 28x28 (bilinear), scaled to [-1, 1]. Never client
                data, never the Fashion-MNIST test set (the data-free premise).
    UNTRAINED   the same generator, seeded and frozen, with no pre-training
                ("FedKTL-randG", the ablation showing how much the generator's knowledge matters).

Architecture (StyleGAN2's ideas at toy scale; sizes in GeneratorConfig; 38,969 parameters in G):
    mapping    z ~ N(0, I_64), pixel-normalised, then 4 x [Linear(64 -> 64) (He-initialised for LeakyReLU,
               bias 0), LeakyReLU(0.2)] -> w in R^64
    synthesis  a learned constant 32x7x7; three weight-modulated 3x3 convolutions (style = an affine map of
               w, N(0, 1/64) weights, bias 1; weights demodulated; LeakyReLU(0.2)) at 7x7, 14x14 and 28x28
               (bilinear upsampling between them, 32 -> 32 -> 16 -> 8 channels), then a modulated 1x1
               convolution to one channel (no demodulation) and tanh: images in [-1, 1]. It takes one w
               per style input (num_ws = 4), as StyleGAN's G.synthesis takes ws [B, num_ws, w_dim]; FedKTL
               repeats one w over all of them. No noise inputs (StyleGAN's noise_mode='const', made fixed).
    discriminator (pre-training only) 3x3 convolutions 1 -> 8 (28x28) -> 16 (stride 2, 14x14) -> 32
               (stride 2, 7x7), LeakyReLU(0.2), a minibatch-standard-deviation channel, Linear(33*7*7 -> 1).
    training   400 steps; Adam(lr 0.002, betas (0, 0.99)) for both nets, the mapping network at 0.1 x lr;
               batch 32 drawn from the digits with a seeded torch.Generator; non-saturating loss
               softplus(-D(G(z))) for G, softplus(D(G(z))) + softplus(-D(x)) for D, R1 penalty on D
               (gamma 1, every 4th step, lazily scaled by 4). About 20 s on one CPU core; the samples are
               recognisable, varied digits (blurred: the data are 8x8 upsampled).

Determinism and caching: the pre-training is a pure function of GeneratorConfig (weights initialised
inside torch.random.fork_rng under torch.manual_seed(config.seed); batches and latents from a
torch.Generator seeded from config.seed; one CPU thread while it runs, whatever --threads says).
Its result is cached in a file named by a hash of the config, the code version and the torch
version, under --ktl_generator_cache (default $XDG_CACHE_HOME/fedsuite/fedktl-generator, else
~/.cache/...), so runs do not repeat it; the file also holds the config, the pre-training time and
the last losses. The run's server state holds the generator's weights (so a resume needs no cache).
"""
import hashlib
import json
import math
import os
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from utils import atomic_torch_save

GENERATOR_VERSION = 1        # bump when the architecture or the pre-training changes: new cache keys
PUBLIC_DATASET = "sklearn-digits"
PAPER_GENERATOR = "StyleGAN-XL"


@dataclass(frozen=True)
class GeneratorConfig:
    """Everything the generator and its pre-training depend on (the cache key)."""
    z_dim: int = 64
    w_dim: int = 64
    mapping_layers: int = 4
    channels: tuple = (32, 16, 8)     # at 7x7 (also the constant), 14x14, 28x28
    base_resolution: int = 7
    steps: int = 400                  # pre-training steps (G and D once each a step)
    batch_size: int = 32
    lr: float = 0.002
    mapping_lr_scale: float = 0.1     # a lower learning rate for the mapping network (StyleGAN: 0.01)
    betas: tuple = (0.0, 0.99)
    r1_gamma: float = 1.0
    r1_every: int = 4
    seed: int = 0
    dataset: str = PUBLIC_DATASET

    @property
    def resolution(self):
        return self.base_resolution * 2 ** (len(self.channels) - 1)

    @property
    def num_ws(self):
        return len(self.channels) + 1

    def key(self):
        """A short hash naming the cached file: config, code version and torch version."""
        text = json.dumps({"config": asdict(self), "version": GENERATOR_VERSION,
                           "torch": torch.__version__.split("+")[0]}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def describe(config, untrained=False):
    """The substitute's label, written into every log line FedKTL writes."""
    if untrained:
        return (f"generator: substitute UNTRAINED (small StyleGAN-like G, random frozen weights, seed "
                f"{config.seed}; ablation), not {PAPER_GENERATOR}")
    return (f"generator: substitute (small StyleGAN-like G pre-trained by the server on {config.dataset}, "
            f"{config.steps} steps, seed {config.seed}), not {PAPER_GENERATOR}")


# ============================================================================ the networks

class MappingNetwork(nn.Module):
    """z -> w: pixel norm, then `layers` x [Linear(w_dim), LeakyReLU(0.2)]."""

    def __init__(self, z_dim, w_dim, layers):
        super().__init__()
        blocks = []
        for i in range(layers):
            linear = nn.Linear(z_dim if i == 0 else w_dim, w_dim)
            nn.init.kaiming_normal_(linear.weight, a=0.2)     # keeps the activations' scale (StyleGAN's gain)
            nn.init.zeros_(linear.bias)
            blocks += [linear, nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*blocks)

    def forward(self, z):
        z = z * torch.rsqrt(z.square().mean(1, keepdim=True) + 1e-8)
        return self.net(z)


class ModulatedConv(nn.Module):
    """StyleGAN2's modulated convolution (the unfused form): x scaled per input channel by the
    style s = affine(w), convolved with the shared weight, then (demodulate) scaled per output
    channel by 1 / sqrt(sum_{in,k} (weight * s)^2 + 1e-8)."""

    def __init__(self, in_channels, out_channels, kernel, w_dim, demodulate=True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, kernel, kernel)
                                   / math.sqrt(in_channels * kernel * kernel))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.affine = nn.Linear(w_dim, in_channels)
        nn.init.normal_(self.affine.weight, std=1 / math.sqrt(w_dim))
        nn.init.ones_(self.affine.bias)
        self.demodulate, self.padding = demodulate, kernel // 2

    def forward(self, x, w):
        style = self.affine(w)                                        # [B, in]
        x = F.conv2d(x * style[:, :, None, None], self.weight, padding=self.padding)
        if self.demodulate:
            power = (self.weight.square().sum((2, 3))[None] * style.square()[:, None, :]).sum(2)   # [B, out]
            x = x * torch.rsqrt(power + 1e-8)[:, :, None, None]
        return x + self.bias[None, :, None, None]


class SynthesisNetwork(nn.Module):
    """ws [B, num_ws, w_dim] (or w [B, w_dim], repeated) -> images [B, 1, 28, 28] in [-1, 1]."""

    def __init__(self, w_dim, channels, base_resolution):
        super().__init__()
        self.const = nn.Parameter(torch.randn(channels[0], base_resolution, base_resolution))
        ins = (channels[0],) + tuple(channels[:-1])
        self.convs = nn.ModuleList(ModulatedConv(i, o, 3, w_dim) for i, o in zip(ins, channels))
        self.to_image = ModulatedConv(channels[-1], 1, 1, w_dim, demodulate=False)
        self.num_ws = len(channels) + 1

    def forward(self, ws):
        if ws.dim() == 2:
            ws = ws[:, None, :].expand(-1, self.num_ws, -1)
        x = self.const[None].expand(len(ws), -1, -1, -1)
        for i, conv in enumerate(self.convs):
            if i > 0:
                x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = F.leaky_relu(conv(x, ws[:, i]), 0.2)
        return torch.tanh(self.to_image(x, ws[:, -1]))


class StyleGenerator(nn.Module):
    """G = (mapping, synthesis), StyleGAN's split and attribute names (z_dim, w_dim, num_ws,
    img_resolution, img_channels)."""

    def __init__(self, config):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws = config.z_dim, config.w_dim, config.num_ws
        self.img_resolution, self.img_channels = config.resolution, 1
        self.mapping = MappingNetwork(config.z_dim, config.w_dim, config.mapping_layers)
        self.synthesis = SynthesisNetwork(config.w_dim, config.channels, config.base_resolution)

    def forward(self, z):
        return self.synthesis(self.mapping(z))


class Discriminator(nn.Module):
    def __init__(self, config):
        super().__init__()
        widths = tuple(reversed(config.channels))      # 16, 32, 64
        layers, previous = [], 1
        for i, width in enumerate(widths):
            layers += [nn.Conv2d(previous, width, 3, stride=1 if i == 0 else 2, padding=1), nn.LeakyReLU(0.2)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.out = nn.Linear((previous + 1) * config.base_resolution ** 2, 1)

    def forward(self, x):
        h = self.features(x)
        spread = h.std(0, unbiased=False).mean().expand(len(h), 1, *h.shape[2:])   # minibatch std (StyleGAN)
        return self.out(torch.cat([h, spread], 1).flatten(1)).squeeze(1)


# ============================================================================ data and pre-training

def digits_pixels():
    """The 1,797 x 64 grey levels of scikit-learn's bundled digits: the file load_digits reads
    (sklearn/datasets/data/digits.csv.gz, 64 pixels and the label a row), read without importing
    scikit-learn (a second saved); load_digits where the file is not found."""
    import importlib.util

    import numpy as np
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise ImportError("FedKTL's substitute generator is pre-trained on scikit-learn's bundled digits: "
                          "pip install scikit-learn (requirements.txt), or use --ktl_generator untrained")
    path = os.path.join(os.path.dirname(spec.origin), "datasets", "data", "digits.csv.gz")
    if os.path.isfile(path):
        return np.loadtxt(path, delimiter=",", dtype=np.float32)[:, :-1]
    from sklearn.datasets import load_digits
    return load_digits().data.astype(np.float32)


def public_images(resolution=28):
    """scikit-learn's bundled digits (1,797 x 8 x 8, grey levels 0..16), upsampled to
    resolution x resolution (bilinear) and scaled to [-1, 1]: [1797, 1, R, R] float32."""
    digits = torch.tensor(digits_pixels(), dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    images = F.interpolate(digits, size=(resolution, resolution), mode="bilinear", align_corners=False)
    return images.clamp(0, 1) * 2 - 1


@contextmanager
def one_thread():
    """torch on one CPU thread inside the block (the same floating-point order on every machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def seeded_modules(config):
    """(G, D) initialised from torch.manual_seed(config.seed) without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return StyleGenerator(config), Discriminator(config)


def untrained_generator(config):
    """The ablation's G: the seeded initial weights, frozen."""
    return seeded_modules(config)[0].requires_grad_(False).eval()


def pretrain(config):
    """Train G as a GAN on the public digits; returns (G frozen in eval mode, info dict with
    seconds and the last losses). A pure function of `config` (CPU, one thread)."""
    started = time.perf_counter()
    with one_thread():
        real = public_images(config.resolution)
        G, D = seeded_modules(config)
        generator = torch.Generator().manual_seed(config.seed)
        opt_g = torch.optim.Adam([{"params": G.synthesis.parameters()},
                                  {"params": G.mapping.parameters(), "lr": config.lr * config.mapping_lr_scale}],
                                 lr=config.lr, betas=config.betas)
        opt_d = torch.optim.Adam(D.parameters(), lr=config.lr, betas=config.betas)
        loss_g = loss_d = torch.zeros(())
        for step in range(config.steps):
            x = real[torch.randint(len(real), (config.batch_size,), generator=generator)]
            z = torch.randn(config.batch_size, config.z_dim, generator=generator)
            # discriminator: softplus(D(G(z))) + softplus(-D(x)) [+ R1 every r1_every steps]
            fake = G(z).detach()
            if config.r1_gamma > 0 and step % config.r1_every == 0:
                x = x.requires_grad_(True)
            score_real = D(x)
            loss_d = F.softplus(D(fake)).mean() + F.softplus(-score_real).mean()
            if x.requires_grad:
                grad, = torch.autograd.grad(score_real.sum(), x, create_graph=True)
                loss_d = loss_d + config.r1_gamma / 2 * grad.square().sum((1, 2, 3)).mean() * config.r1_every
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            # generator: non-saturating softplus(-D(G(z)))
            z = torch.randn(config.batch_size, config.z_dim, generator=generator)
            loss_g = F.softplus(-D(G(z))).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
    info = {"seconds": time.perf_counter() - started, "loss_g": loss_g.item(), "loss_d": loss_d.item()}
    return G.requires_grad_(False).eval(), info


def default_cache_dir():
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "fedsuite", "fedktl-generator")


def cache_path(config, cache_dir=None):
    return os.path.join(cache_dir or default_cache_dir(), f"{config.dataset}-{config.key()}.pt")


def pretrained_generator(config, cache_dir=None):
    """(G, info): the pre-trained substitute, from the cache file for `config` when it is there
    (info["cached"] True), else pre-trained now and written there. An unreadable cache file is
    replaced. info holds the path, the config, the pre-training seconds and the last losses."""
    path = cache_path(config, cache_dir)
    if os.path.isfile(path):
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            G = StyleGenerator(config)
            G.load_state_dict(saved["state_dict"])
            info = dict(saved["info"], cached=True, path=path)
            return G.requires_grad_(False).eval(), info
        except Exception:         # a truncated or foreign file: pre-train again and overwrite it
            pass
    G, info = pretrain(config)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    atomic_torch_save({"config": asdict(config), "version": GENERATOR_VERSION, "info": info,
                       "state_dict": G.state_dict()}, path)
    return G, dict(info, cached=False, path=path)


@torch.no_grad()
def render(G, latents, image_shape):
    """Images for the clients from latents [N, w_dim]: G.synthesis with each w repeated over all
    style inputs, mapped from [-1, 1] to [0, 1] (StyleGAN's w_to_img: (x + 1) / 2, clamped), then
    the reference's `clientprocess`: resized (shorter side) and center-cropped to the clients'
    H x W, channels repeated to theirs. The clients normalise them like their own data."""
    images = ((G.synthesis(latents) + 1) / 2).clamp(0, 1)
    channels, height, width = image_shape
    if tuple(images.shape[-2:]) != (height, width):
        from torchvision.transforms import functional as TF
        images = TF.center_crop(TF.resize(images, min(height, width), antialias=True), [height, width])
    return images.expand(-1, channels, -1, -1).contiguous() if channels != images.shape[1] else images

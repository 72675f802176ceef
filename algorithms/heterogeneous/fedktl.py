"""FedKTL (Zhang, Liu, Hua and Cao, "An Upload-Efficient Scheme for Transferring Knowledge From a
Server-Side Pre-trained Generator to Clients in Heterogeneous Federated Learning", CVPR 2024), run
with a SUBSTITUTE generator: every log line this module writes, and every client's metrics
("generator", beside its round's mean ArcFace CE and knowledge-transfer MSE: arcface_ce, kt_mse),
say which (spec/pfl-advanced.md sections 6, 6a; generator.py builds it).

    FedKTL-sub    G = a small StyleGAN-like generator pre-trained by the server on scikit-learn's
                  bundled digits (another domain, shipped in a package; never client data), not
                  the paper's StyleGAN-XL. Registry name fedktl-sub.
    FedKTL-randG  the same G untrained (seeded, frozen): the ablation (--ktl_generator untrained,
                  registry name fedktl-randg). Neither is "FedKTL": never report them under that name.

Clients keep their own architectures and whole models; nothing is aggregated. With K = C classes:

Fixed objects, made once by the server and sent once (in the first round's download):
    ETF      M = sqrt(K / (K - 1)) P (I_K - 1 1^T / K), P the orthogonal factor of the QR of a
             Uniform[0, 1) K x K matrix; class c's vertex v_c = column c of M (unit norm, pairwise
             cosine -1 / (K - 1)); V = the vertices as rows
    proj_fc  Linear(D -> w_dim), random: the clients' projection into G's latent space
Client k (model phi_k, head Linear(D -> K); q = normalize(head(phi_k(x)))):
    predict  argmax_c cos(q, v_c)                       (also the reported model, --eval local; in
             round 0 the untrained model, which predicts about one class a client: under strong label
             skew often below chance)
    loss     CE(s * l~, y) + mu * MSE(proj_fc(phi_k(x_G)), w_G)
             l~_c = cos theta_c for c != y, cos(theta_y + m) for y (ArcFace), theta = arccos of the
             cosine clamped to [-1 + 1e-7, 1 - 1e-7]; m = 0.5, s = 64 (hard-coded in the reference);
             (x_G, w_G) cycles through the server's C image-latent pairs in shuffled batches of the
             client batch size; no KT term before the first pairs exist (round 0)
             One optimiser (--optimizer/--lr/...; the reference: plain SGD at the local lr, HtFLlib
             0.01: --momentum 0 --reg 0 --lr 0.01, or --scenario pfllib --lr 0.01; with the engine's
             momentum 0.9, ArcFace's s = 64 trains poorly) over the model and a copy of proj_fc, each
             clipped to gradient norm 100. proj_fc is reloaded from the server's initial copy every round and
             the client's updates to it are dropped (the reference's behaviour).
    upload   P_k^c = normalize(mean over its class-c training samples of q), eval mode, after
             training, for the classes it holds: at most K x K floats (400 bytes for K = 10)
Server, each round, over the uploaded pairs (P, c):
    1. Centroids[c] <- mean of F(P) over class c (F in eval mode); absent classes keep theirs
    2. E_s epochs of shuffled batches of b_s (a final batch of one is dropped: BatchNorm, HtFLlib's
       guard): Q = F(P), W = G.mapping(z), z ~ N(0, I), one per prototype;
       loss = MMD^2_RBF(Q, W) + lambda * MSE(Q, Centroids[c]) (the kernel of FedCP: bandwidths 10, 15,
       20, 50); Adam(eta_s, betas 0.9/0.999, re-created every round) on F and Centroids, clip 100 each
    3. Centroids[c] <- class means of F(P) again; w_c = Centroids[c] for every class c
    4. x_c = G.synthesis(w_c repeated over all style inputs) in [0, 1], resized to the clients' images
       (generator.render); one image per class. Download: the C pairs (x_c, w_c) to every client.
    F = Linear(K -> K) -> BatchNorm1d(K) -> ReLU -> Linear(K -> w_dim); Centroids = C x w_dim, N(0, 1) at first.

Flags (defaults from TsingZ0/FedKTL system/main.py and run_me.sh for StyleGAN-XL; HtFLlib total.sh
runs the same: -slr 0.01 -sbs 100 -se 100 -lam 1 -mu 50, with -lr 0.01 -lbs 10 -ls 1):
    --ktl_mu 50.0                 mu, the weight of the knowledge-transfer MSE
    --ktl_lambda 1.0              lambda, the weight of MSE(Q, Centroids[c]) in the server's loss
                                  (StyleGAN3 runs: 0.1; Stable Diffusion: 0.01)
    --ktl_server_lr 0.01          eta_s, the server's Adam learning rate
    --ktl_server_batch_size 100   b_s
    --ktl_server_epochs 100       E_s
    --ktl_generator pretrained    pretrained (FedKTL-sub) or untrained (FedKTL-randG, the ablation)
    --ktl_generator_steps 400     the substitute's pre-training steps (this suite; generator.py)
    --ktl_generator_seed 0        the substitute's own seed (not --init_seed: every run shares one G)
    --ktl_generator_cache ''      folder of the pre-trained generators ('' = ~/.cache/fedsuite/fedktl-generator)

Reference differences:
- The generator is the substitute above, not StyleGAN-XL/StyleGAN3/Stable Diffusion (spec 6a): its
  latent space is 64-d (w_dim), its images 1 x 28 x 28 rendered from 8 x 8 digits. The reference
  samples StyleGAN-XL latents with random class labels and keeps the first w row; the substitute is
  unconditional and has one w per image.
- Every random object comes from seeded generators: the ETF's Uniform matrix, proj_fc, F and the
  initial Centroids from seeds derived from (--init_seed, "fedktl", ...), made with PyTorch's default
  initialisations; the server's shuffles and latents from the round's server generator; the clients'
  batches and pair shuffles from theirs. The reference uses numpy's unseeded global RNG for the ETF
  (a QR retried until an assertion holds: float64 here, no retry needed) and for the latents.
- proj_fc is one Linear(D -> w_dim) per feature size D in the run (the reference has one D); clients
  of different feature sizes are allowed (their prototypes are K-dimensional either way).
- Prototypes are taken over the client's whole training split in stored order, without augmentation
  (the reference's loader drops the last partial batch; its shuffle is off in HtFLlib).
- The client's local training is the engine's: local_steps(ctx) steps on shuffled, augmented batches
  (--no_augment, --epochs 1 --drop_last, --scenario pfllib for the reference's epoch of plain SGD).
- ETF and proj_fc travel once, in round 0's download (every client receives it: --eval local), and
  stay in each client's state; the pairs travel every round. The images travel in [0, 1] and each
  client normalises them with its data's mean and std (the reference's server normalises with
  0.5 / 0.5, its clients' normalisation).
- The server's images are not saved as PNG files (the reference writes Server_image_R.png); they are
  in the checkpoint (server_state["pairs"]).
- The reference clamps nothing before arccos (NaN gradients at |cos| = 1); here the cosine is clamped.
"""
import sys
from dataclasses import asdict, replace

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.heterogeneous import generator as gen
from algorithms.heterogeneous.common import ClassMeans, feature_dim
from algorithms.personalised.fedcp import mmd_rbf
import cvdataset
from engine import Algorithm, ClientResult, Flag, main
from utils import UsageError, derived_seed

KTL_SOURCE = "TsingZ0/FedKTL system/main.py, run_me.sh (StyleGAN-XL); HtFLlib system/total.sh"
SUITE = "this suite (substitute generator, spec/pfl-advanced.md 6a)"
ARCFACE_MARGIN = 0.5        # m, hard-coded in clientktl.py
ARCFACE_SCALE = 64.0        # s, hard-coded in clientktl.py
GRAD_CLIP = 100.0           # clip_grad_norm_ on every trained module, client and server
COSINE_EPS = 1e-7           # the clamp before arccos (the reference has none)


# ============================================================================ FedKTL's pieces

def etf_matrix(num_classes, generator):
    """M = sqrt(K / (K - 1)) P (I - 1 1^T / K), P from the QR of a Uniform[0, 1) K x K matrix
    (float64, then float32). Columns are the class vertices."""
    K = num_classes
    P, _ = torch.linalg.qr(torch.rand(K, K, generator=generator, dtype=torch.float64))
    M = (K / (K - 1)) ** 0.5 * P @ (torch.eye(K, dtype=torch.float64) - torch.ones(K, K, dtype=torch.float64) / K)
    return M.float()


def etf_vertices(etf):
    """V [C, K]: the unit class vertices as rows (the reference's F.normalize(ETF.T))."""
    return F.normalize(etf.T, dim=1)


def arcface_logits(cosine, labels, margin=ARCFACE_MARGIN, scale=ARCFACE_SCALE, eps=COSINE_EPS):
    """s * l~: cos theta_c for c != y, cos(theta_y + m) for the label, theta = arccos(clamped cosine)."""
    target = torch.cos(torch.acos(cosine.clamp(-1 + eps, 1 - eps)) + margin)
    one_hot = F.one_hot(labels, cosine.shape[1]).to(cosine.dtype)
    return scale * (one_hot * target + (1 - one_hot) * cosine)


def knowledge_transfer_loss(model, proj_fc, images, latents):
    """MSE(proj_fc(phi(x_G)), w_G), the mean over all elements."""
    return F.mse_loss(proj_fc(model.features(images)), latents)


def output_prototypes(outputs, labels, num_classes):
    """{c: normalize(mean over class c of normalize(output))} for the classes present."""
    means = ClassMeans(num_classes)
    means.add(F.normalize(outputs.detach(), dim=1), labels)
    return {c: F.normalize(p, dim=0) for c, p in means.means().items()}


class FeatureTransformer(nn.Module):
    """F: Linear(K -> K) -> BatchNorm1d(K) -> ReLU -> Linear(K -> w_dim) (serverktl's Feature_Transformer)."""

    def __init__(self, in_features, out_features):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_features, in_features), nn.BatchNorm1d(in_features), nn.ReLU(),
                                 nn.Linear(in_features, out_features))

    def forward(self, x):
        return self.mlp(x)


def alignment_loss(Q, W, centroids, lamda):
    """The server's loss on one batch, (MMD^2_RBF(Q, W) + lambda * MSE(Q, Centroids[c]), the MMD,
    the MSE); `centroids` holds Centroids[c] of each row of Q."""
    mmd, mse = mmd_rbf(Q, W), F.mse_loss(Q, centroids)
    return mmd + lamda * mse, mmd.detach(), mse.detach()


@torch.no_grad()
def class_centroids(transformer, prototypes, labels, centroids):
    """Centroids[c] <- mean of F(P) over the prototypes of class c, F in eval mode; the classes
    without prototypes keep their rows. Returns the new table."""
    transformer.eval()
    out = centroids.clone()
    Q = transformer(prototypes)
    for c in labels.unique().tolist():
        out[c] = Q[labels == c].mean(0)
    return out


def server_batches(n, batch_size, generator):
    """Shuffled index batches of one epoch over n items; a final batch of one is dropped
    (BatchNorm1d cannot train on it: HtFLlib's guard)."""
    order = torch.randperm(n, generator=generator)
    batches = list(order.split(batch_size))
    if batches and len(batches[-1]) == 1:
        batches.pop()
    return batches


class PairStream:
    """Endless shuffled batches of the server's (image, latent) pairs, a fresh order each pass
    (the reference's DataLoader(shuffle=True, drop_last=False), cycled)."""

    def __init__(self, images, latents, batch_size, generator):
        self.images, self.latents, self.batch_size, self.generator = images, latents, batch_size, generator
        self.batches = []

    def next(self):
        if not self.batches:
            self.batches = list(torch.randperm(len(self.latents), generator=self.generator).split(self.batch_size))
        index = self.batches.pop(0).to(self.latents.device)
        return self.images[index], self.latents[index]


class ETFPredictor(nn.Module):
    """The reported model: scores = cos(normalize(model(x)), v_c) for every class."""

    def __init__(self, model, etf):
        super().__init__()
        self.model = model
        self.register_buffer("vertices", etf_vertices(etf))

    def forward(self, x):
        return F.normalize(self.model(x), dim=1) @ self.vertices.T


def normalise_images(images, mean, std):
    """Images in [0, 1] normalised like a client's data: (x - mean) / std per channel."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def seeded(seed, build):
    """build() with torch's global RNG seeded by `seed` for the moment (PyTorch's default
    initialisations, reproducible), the global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


# ============================================================================ the algorithm

class FedKTL(Algorithm):
    name = "fedktl-sub"
    evaluations = ("local",)
    keeps_local_model = True       # every client keeps its whole model (state "local_model")
    broadcast_to_all = True        # ETF and proj_fc (round 0) and the pairs reach every client
    flags = (
        Flag("ktl_mu", float, 50.0, "FedKTL: mu, weight of the knowledge-transfer MSE(proj_fc(phi(x_G)), w_G)",
             KTL_SOURCE),
        Flag("ktl_lambda", float, 1.0, "FedKTL: lambda, weight of MSE(F(P), Centroids[c]) in the server's loss",
             KTL_SOURCE),
        Flag("ktl_server_lr", float, 0.01, "FedKTL: eta_s, the server's Adam learning rate", KTL_SOURCE),
        Flag("ktl_server_batch_size", int, 100, "FedKTL: b_s, the server's batch of prototypes", KTL_SOURCE),
        Flag("ktl_server_epochs", int, 100, "FedKTL: E_s, the server's epochs over the prototypes a round",
             KTL_SOURCE),
        Flag("ktl_generator", str, "pretrained",
             "FedKTL's substitute generator: pretrained (FedKTL-sub: pre-trained on sklearn digits) or "
             "untrained (FedKTL-randG ablation)", SUITE),
        Flag("ktl_generator_steps", int, gen.GeneratorConfig.steps,
             "FedKTL: pre-training steps of the substitute generator", SUITE),
        Flag("ktl_generator_seed", int, 0, "FedKTL: the substitute generator's own seed", SUITE),
        Flag("ktl_generator_cache", str, "",
             "FedKTL: folder caching pre-trained generators ('' = ~/.cache/fedsuite/fedktl-generator)", SUITE),
    )

    @classmethod
    def check_args(cls, args):
        for flag in ("ktl_mu", "ktl_lambda"):
            if not getattr(args, flag) >= 0:
                raise UsageError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
        if not args.ktl_server_lr > 0:
            raise UsageError(f"--ktl_server_lr must be > 0 (got {args.ktl_server_lr})")
        if args.ktl_server_batch_size < 2:
            raise UsageError(f"--ktl_server_batch_size must be >= 2 (BatchNorm; got {args.ktl_server_batch_size})")
        if args.ktl_server_epochs < 0:
            raise UsageError(f"--ktl_server_epochs must be >= 0 (got {args.ktl_server_epochs})")
        if args.ktl_generator not in ("pretrained", "untrained"):
            raise UsageError(f"--ktl_generator must be pretrained or untrained (got {args.ktl_generator})")
        if args.ktl_generator_steps < 1:
            raise UsageError(f"--ktl_generator_steps must be >= 1 (got {args.ktl_generator_steps})")

    def __init__(self, setting):
        super().__init__(setting)
        self.generator_config = replace(gen.GeneratorConfig(), steps=self.args.ktl_generator_steps,
                                        seed=self.args.ktl_generator_seed)
        self.untrained = self.args.ktl_generator == "untrained"
        self.label = ("FedKTL-randG" if self.untrained else "FedKTL-sub") + \
            f" [{gen.describe(self.generator_config, self.untrained)}]"
        self.metric_label = (("FedKTL-randG: substitute G untrained" if self.untrained else
                              f"FedKTL-sub: substitute G pre-trained on {self.generator_config.dataset}")
                             + f", not {gen.PAPER_GENERATOR}")     # in every client's metrics
        self._modules = {}      # server and client modules, made once, loaded with each round's weights

    def seed(self, *parts):
        return derived_seed(self.args.init_seed, "fedktl", *parts)

    def feature_dim(self, architecture):
        return feature_dim(self.model("local", architecture))

    # ------------------------------------------------------------------ server
    def init_server(self, initial_weights):
        """No global model. ETF, proj_fc (one per feature size), F and Centroids, seeded; the
        generator comes in initialise_server (or at the first server_update)."""
        K, w_dim = self.num_classes, self.generator_config.w_dim
        if K < 2:
            raise UsageError("FedKTL's ETF classifier needs at least 2 classes")
        dims = sorted({self.feature_dim(a) for a in self.setting.client_models})
        transformer = seeded(self.seed("F"), lambda: FeatureTransformer(K, w_dim))
        return {
            "weights": {},
            "etf": etf_matrix(K, torch.Generator().manual_seed(self.seed("etf"))).to(self.device),
            "proj_fc": {d: {k: v.to(self.device) for k, v in
                            seeded(self.seed("proj_fc", d), lambda: nn.Linear(d, w_dim)).state_dict().items()}
                        for d in dims},
            "transformer": {k: v.to(self.device) for k, v in transformer.state_dict().items()},
            "centroids": seeded(self.seed("centroids"), lambda: nn.Embedding(K, w_dim)).weight.detach().to(self.device),
            "rounds_aggregated": 0,
        }

    def initialise_server(self, server_state, contexts, server):
        """The pre-run step: build or load the substitute generator (its own seed), and say which."""
        self.ensure_generator(server_state, server)
        server.log(f"{self.label}: each client reports its own model with the ETF classifier "
                   "(argmax cosine to the class vertices) on its own test split")
        return server_state

    def ensure_generator(self, server_state, server):
        """server_state["generator"] (G's weights) and ["generator_config"], made once."""
        if "generator" in server_state:
            return
        config = self.generator_config
        if self.untrained:
            G = gen.untrained_generator(config)
            server.log(f"{self.label}: untrained generator, {sum(p.numel() for p in G.parameters()):,} parameters")
        else:
            G, info = gen.pretrained_generator(config, self.args.ktl_generator_cache or None)
            how = "loaded from the cache" if info["cached"] else "pre-trained now"
            server.log(f"{self.label}: generator {how} ({info['path']}); pre-training took {info['seconds']:.1f} s "
                       f"on one CPU thread, {config.steps} steps on {config.dataset} (1,797 8x8 digits upsampled to "
                       f"28x28), {sum(p.numel() for p in G.parameters()):,} parameters, last losses G "
                       f"{info['loss_g']:.3f} D {info['loss_d']:.3f}")
        server_state["generator"] = {k: v.to(self.device) for k, v in G.state_dict().items()}
        server_state["generator_config"] = {k: list(v) if isinstance(v, tuple) else v
                                            for k, v in asdict(config).items()}

    def module(self, key, build, weights):
        """The module made by build() once per key (on the device), holding `weights`."""
        if key not in self._modules:
            self._modules[key] = build().to(self.device)
        self._modules[key].load_state_dict(weights)
        return self._modules[key]

    def generator(self, server_state):
        """The frozen G holding server_state["generator"]."""
        G = self.module("G", lambda: gen.StyleGenerator(self.generator_config), server_state["generator"])
        return G.requires_grad_(False).eval()

    def download(self, server_state, client_id):
        """The pairs once they exist; ETF and the client's proj_fc in round 0's download."""
        download = {}
        if server_state["rounds_aggregated"] == 0:
            download["etf"] = server_state["etf"]
            download["proj_fc"] = server_state["proj_fc"][self.feature_dim(self.architecture(client_id))]
        if "pairs" in server_state:
            download["pairs"] = server_state["pairs"]
        return download

    def server_update(self, server_state, results, server):
        self.ensure_generator(server_state, server)
        server_state["rounds_aggregated"] += 1
        uploads = [(p, c) for r in results for c, p in r.upload.get("prototypes", {}).items()]
        if not uploads:
            server.log(f"{self.label}: no prototypes this round; the pairs are unchanged")
            return server_state
        prototypes = torch.stack([p for p, _ in uploads]).to(self.device)
        labels = torch.tensor([c for _, c in uploads], device=self.device)
        G = self.generator(server_state)
        transformer = self.module("F", lambda: FeatureTransformer(self.num_classes, G.w_dim),
                                  server_state["transformer"])
        centroids = nn.Parameter(class_centroids(transformer, prototypes, labels, server_state["centroids"]))
        losses = self.align(transformer, centroids, prototypes, labels, G, server)
        centroids = class_centroids(transformer, prototypes, labels, centroids.detach())
        server_state["transformer"] = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
        server_state["centroids"] = centroids
        server_state["pairs"] = {"images": gen.render(G, centroids, self.image_shape), "latents": centroids.clone()}
        server.log(f"{self.label}: server alignment on {len(uploads)} prototypes from {len(results)} clients, "
                   + (f"last epoch MMD {losses[0]:.4f}, centroid MSE {losses[1]:.4f}; " if losses else "no epoch; ")
                   + f"{self.num_classes} image-latent pairs rendered")
        return server_state

    def align(self, transformer, centroids, prototypes, labels, G, server):
        """E_s epochs of Adam (fresh each round) on F and Centroids; returns the last epoch's mean
        (MMD, centroid MSE), or () with no batch."""
        a = self.args
        opt_transformer = torch.optim.Adam(transformer.parameters(), lr=a.ktl_server_lr, betas=(0.9, 0.999))
        opt_centroids = torch.optim.Adam([centroids], lr=a.ktl_server_lr, betas=(0.9, 0.999))
        transformer.train()
        last = ()
        for _ in range(a.ktl_server_epochs):
            mmd_sum = mse_sum = 0.0
            batches = server_batches(len(labels), a.ktl_server_batch_size, server.generator)
            for index in batches:
                index = index.to(self.device)
                Q = transformer(prototypes[index])
                z = torch.randn(len(index), G.z_dim, generator=server.generator).to(self.device)
                W = G.mapping(z).detach()
                loss, mmd, mse = alignment_loss(Q, W, centroids[labels[index]], a.ktl_lambda)
                opt_transformer.zero_grad(set_to_none=True)
                opt_centroids.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(transformer.parameters(), GRAD_CLIP)
                torch.nn.utils.clip_grad_norm_([centroids], GRAD_CLIP)
                opt_transformer.step()
                opt_centroids.step()
                mmd_sum, mse_sum = mmd_sum + mmd.item(), mse_sum + mse.item()
            if batches:
                last = (mmd_sum / len(batches), mse_sum / len(batches))
        return last

    # ------------------------------------------------------------------ client
    def receive(self, ctx):
        """Keep the ETF and the initial proj_fc when they come (round 0)."""
        for key in ("etf", "proj_fc"):
            if key in ctx.download:
                ctx.state[key] = ctx.download[key]

    def client_update(self, ctx):
        model = self.client_model(ctx)
        dim = self.feature_dim(ctx.architecture)          # proj_fc: the server's initial copy, every round
        ctx.proj_fc = proj_fc = self.module(("proj_fc", dim), lambda: nn.Linear(dim, self.generator_config.w_dim),
                                            ctx.state["proj_fc"])
        ctx.vertices = etf_vertices(ctx.state["etf"])
        pairs = ctx.download.get("pairs")
        ctx.pairs = None
        if pairs is not None:
            images = normalise_images(pairs["images"], ctx.data.mean, ctx.data.std)
            ctx.pairs = PairStream(images, pairs["latents"], self.args.batch_size, ctx.generator)
        parameters = list(model.parameters()) + list(proj_fc.parameters())
        ctx.loss_sums = torch.zeros(2, device=self.device)       # ArcFace CE, KT MSE (unweighted)
        steps = self.local_steps(ctx)
        metrics = self.train(ctx, model, parameters, steps, optimizer=self.make_optimizer(parameters))
        arcface, transfer = (ctx.loss_sums / steps).tolist()
        metrics.update(arcface_ce=arcface, kt_mse=transfer if ctx.pairs is not None else None,
                       generator=self.metric_label)
        upload = self.upload(ctx, model)
        self.finish_client(ctx, model)
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, metrics, ctx.log_lines)

    def local_loss(self, model, x, y, ctx):
        """CE(s * ArcFace cosines, y) [+ mu * MSE(proj_fc(phi(x_G)), w_G) once pairs exist]."""
        cosine = F.normalize(model(x), dim=1) @ ctx.vertices.T
        arcface = F.cross_entropy(arcface_logits(cosine, y), y)
        transfer = torch.zeros((), device=arcface.device)
        if ctx.pairs is not None:
            images, latents = ctx.pairs.next()
            transfer = knowledge_transfer_loss(model, ctx.proj_fc, images, latents)
        sums = getattr(ctx, "loss_sums", None)      # the round's means go into the client's metrics
        if sums is not None:
            sums += torch.stack([arcface.detach(), transfer.detach()])
        return arcface + self.args.ktl_mu * transfer

    def before_optimizer_step(self, model, ctx):
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        torch.nn.utils.clip_grad_norm_(ctx.proj_fc.parameters(), GRAD_CLIP)

    @torch.no_grad()
    def upload(self, ctx, model):
        """{"prototypes": {c: normalize(mean of q over class c)}} over the whole training split, eval mode."""
        model.eval()
        data = ctx.data
        outputs = torch.cat([model(cvdataset.normalise(data.images[start:start + 1000], data.mean, data.std))
                             for start in range(0, data.num_samples, 1000)])
        model.train()
        return {"prototypes": output_prototypes(outputs, data.labels, self.num_classes)}

    # ------------------------------------------------------------------ evaluation
    def evaluation_model(self, ctx):
        """The client's own model with the ETF classifier."""
        own = super().evaluation_model(ctx)
        return ETFPredictor(own, ctx.state["etf"]).requires_grad_(False).eval()


class FedKTLRandomG(FedKTL):
    """The ablation FedKTL-randG: FedKTL-sub with the substitute generator untrained (frozen random
    weights), so the generated images carry no pre-trained knowledge (spec 6a, item 2)."""
    name = "fedktl-randg"
    flags = (Flag("ktl_generator", str, "untrained",
                  "FedKTL's substitute generator: pretrained or untrained (this class: the ablation)", SUITE),)


if __name__ == "__main__":
    sys.exit(main(FedKTL))

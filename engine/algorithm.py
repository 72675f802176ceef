"""The algorithm interface: what a client receives, its local update, what it uploads, what the
server does with a round's uploads, and what is evaluated.

One round, as the engine (engine/loop.py) runs it:

    for each client k that receives the download (the sampled ones; every client with
    broadcast_to_all or --eval local), anywhere (this process, a worker, a Ray actor):
        download_k = algorithm.download(server_state, k)              # counted as bytes down
        ctx_k      = ClientContext(k, round, download_k, state_k, data_k, rng_k)
        algorithm.receive(ctx_k)                                      # e.g. FedALA's adaptation
        --eval local: algorithm.evaluation_model(ctx_k) scored on k's own test split
        if k is sampled: result_k = algorithm.client_update(ctx_k)
                     # result_k.upload is counted as bytes up; result_k.state becomes state_k
    server_state = algorithm.server_update(server_state, results, ServerContext(round, rng))
    evaluate (--eval global | groups), log, checkpoint

Everything an algorithm keeps between rounds lives in two places the engine checkpoints:
`server_state` (a dict: "weights" is the global model's state dict, whole, partial or absent;
anything else the server keeps, e.g. momentum, control variates, a generator's weights and its
optimiser's state) and each client's `state` (a dict, empty unless the algorithm stores
something: a personal head, control variates, its last local model). Random draws come from
the generators the engine passes in, seeded by (init_seed, round, client) and
(init_seed, round, "server"), so nothing else needs saving and a resumed run repeats exactly.

The defaults below are FedAvg's (McMahan et al. 2017): download the global weights, run
`num_local_iterations` SGD steps (or `--epochs` passes) of `local_loss` (CE), upload the weights, average them
weighted by sample counts. An algorithm overrides only what differs; see
algorithms/TEMPLATE.py for a file to start from.
"""
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from models import build_model, head_prefix
from utils import UsageError


class TrainingDiverged(Exception):
    """A local loss became NaN or infinite."""


@dataclass
class Flag:
    """A command-line flag an algorithm declares: --name, its type, default, help, and where the
    default comes from (a paper, a reference repository, the seed's command line)."""
    name: str
    type: type
    default: object
    help: str
    source: str = ""


@dataclass
class Setting:
    """What every algorithm instance knows about the run, in the driver and in every worker.
    It holds no client data: that reaches a client's update through its ClientContext."""
    args: object
    num_classes: int
    image_shape: tuple
    device: torch.device
    client_models: list        # the architecture name of every client (--client_models)
    num_samples: list          # training samples of every client
    class_counts: torch.Tensor  # [clients, classes] training label counts
    initial_weights: dict      # architecture name -> its initial state dict
    held_out: dict = None      # the server's own data (FedF2DG's model selection): {"validation": (images,
                               # labels) or None (no --validation_size), "test": (images, labels) or None
                               # (--eval local), "mean", "std"}


@dataclass
class ClientContext:
    """One client's round. `state` is its persistent state (updated in place); `download` what
    the server sent it; `data` its own data (engine.data.ClientData); every random draw of the
    update comes from `generator`."""
    client_id: int
    round: int
    download: dict
    state: dict
    data: object
    generator: torch.Generator
    architecture: str
    global_model: torch.nn.Module = None    # frozen, eval mode, holding download["weights"] when whole
    previous_weights: dict = None           # keeps_local_model: its last local model (else the initial one)
    step: int = 0
    log_lines: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)     # figures for metrics.jsonl's client_metrics (drift, budget, ...)
    artifacts: dict = field(default_factory=dict)   # tensors saved in the run directory, never uploaded
    # the privacy probe (privacy.py) only: train on this one normalised (x, y) batch, as it is, for
    # `override_steps` steps, instead of the client's stream and local_steps (None: the run's own)
    override_batch: tuple = None
    override_steps: int = None

    def log(self, line):
        """A log line, printed by the engine after this client in sampled order."""
        self.log_lines.append(line)


@dataclass
class ClientResult:
    client_id: int
    num_samples: int
    upload: dict        # everything sent to the server: counted in bytes_uploaded
    state: dict         # the client's new persistent state (kept by the driver, never uploaded)
    metrics: dict       # train_loss, steps, ...: for logs and observers, not counted as uploaded
    log_lines: list
    evaluation: dict = field(default_factory=dict)   # --eval local: {series: (correct, tested)} before training
    artifacts: dict = field(default_factory=dict)    # for the experimenter, saved in the run directory, never uploaded


@dataclass
class ServerContext:
    """What server_update sees besides the state and the uploads."""
    round: int
    generator: torch.Generator    # seeded by (init_seed, round, "server")
    device: torch.device
    log_lines: list = field(default_factory=list)
    metrics: dict = field(default_factory=dict)   # figures of the server's round (FedF2DG's stage) for its record
    artifacts: dict = field(default_factory=dict)  # tensors for the experimenter (FedF2DG's pseudo images), saved in the run directory

    def log(self, line):
        self.log_lines.append(line)


# ============================================================================ helpers

class FixedBatch:
    """A stream serving one (x, y) batch at every step: ClientContext.override_batch (the privacy probe)."""

    def __init__(self, batch):
        self.batch = batch

    def next(self):
        return self.batch


def clone_weights(weights):
    return {k: v.detach().clone() for k, v in weights.items()}


def split_head(weights, prefix):
    """(base, head): the entries of `weights` outside and inside the head (keys starting with
    `prefix`, e.g. Algorithm.head_prefix(architecture))."""
    base = {k: v for k, v in weights.items() if not k.startswith(prefix)}
    head = {k: v for k, v in weights.items() if k.startswith(prefix)}
    return base, head


def weighted_average(states, weights):
    """sum_k w_k * state_k / sum_k w_k for every entry, over the states that hold the entry (so
    clients with different architectures average what they share); integer entries are
    rounded back."""
    out = {}
    for key in dict.fromkeys(k for s in states for k in s):
        owners = [(s[key], w) for s, w in zip(states, weights) if key in s]
        total = float(sum(w for _, w in owners))
        acc = sum(value.double() * (w / total) for value, w in owners)
        dtype = owners[0][0].dtype
        out[key] = acc.to(dtype) if owners[0][0].is_floating_point() else acc.round().to(dtype)
    return out


# ============================================================================ the base

class Algorithm:
    """The base every algorithm extends; its defaults are FedAvg's.

    Client: model = the client's architecture loaded with (its kept weights, overwritten by the
    downloaded weights); `local_steps` (--num_local_iterations or --epochs) steps of SGD on
    `local_loss`; upload the weights.
    Server: w = sum_k (n_k / n) w_k over the uploads (per entry, over the clients that sent it).
    """
    name = "algorithm"
    flags = ()                  # Flag(...)s of this class; subclasses add theirs (see all_flags)
    keeps_local_model = False   # True: each client keeps its last trained model (ctx.previous_weights)
    broadcast_to_all = False    # True: every client receives the download each round (so does --eval local)
    evaluations = ("global", "local", "groups")   # the --eval protocols it supports (personalised: local)

    def __init__(self, setting):
        self.setting = setting
        self.args = setting.args
        self.device = setting.device
        self.num_classes = setting.num_classes
        self.image_shape = setting.image_shape
        self._models = {}

    @classmethod
    def all_flags(cls):
        """The flags of this class and its bases, base first."""
        flags = {}
        for klass in reversed(cls.__mro__):
            for flag in vars(klass).get("flags", ()):
                flags[flag.name] = flag
        return list(flags.values())

    @classmethod
    def check_args(cls, args):
        """Algorithm-specific flag checks; raise utils.UsageError."""

    # ------------------------------------------------------------------ models
    def architecture(self, client_id):
        return self.setting.client_models[client_id]

    def new_model(self, architecture=None):
        return build_model(architecture or self.args.model, self.num_classes, self.image_shape).to(self.device)

    def model(self, role, architecture=None):
        """A model instance kept for reuse, one per (role, architecture): "local", "global", ..."""
        key = (role, architecture or self.args.model)
        if key not in self._models:
            self._models[key] = self.new_model(key[1])
        return self._models[key]

    def head_prefix(self, architecture=None):
        """The state-dict prefix of the architecture's head: "classifier." (SimpleCNN), "head." (FedAvgCNN)."""
        return head_prefix(self.model("local", architecture))

    def frozen_model(self, role, architecture, weights):
        """The (role, architecture) model in eval mode without gradients, holding `weights`."""
        model = self.model(role, architecture)
        model.requires_grad_(False)
        model.load_state_dict(weights)
        model.eval()
        return model

    def make_optimizer(self, params):
        a = self.args
        if a.optimizer == "sgd":
            return torch.optim.SGD(params, lr=a.lr, momentum=a.momentum, weight_decay=a.reg)
        return torch.optim.Adam(params, lr=a.lr, weight_decay=a.reg, amsgrad=a.optimizer == "amsgrad")

    # ------------------------------------------------------------------ server side
    def init_server(self, initial_weights):
        """The server's state before round 0; `initial_weights` is the global model (--model)."""
        return {"weights": clone_weights(initial_weights)}

    def initialise_server(self, server_state, contexts, server):
        """Once before round 0 (not on resume), in the driver, with a ClientContext for every
        client (round -1, its download, empty state, its data and generator): e.g. FedDBE's
        initialisation epoch. Returns the server state; default: unchanged."""
        return server_state

    def download(self, server_state, client_id):
        """What the server sends client `client_id` this round (counted in bytes_downloaded)."""
        return {"weights": server_state["weights"]}

    def server_update(self, server_state, results, server):
        """The new server state from this round's ClientResults (in sampled order): every
        uploaded entry averaged over the clients that uploaded it; the others keep their value."""
        averaged = weighted_average([r.upload["weights"] for r in results], [r.num_samples for r in results])
        server_state["weights"] = {**server_state["weights"], **averaged}
        return server_state

    def global_weights(self, server_state):
        """The global model's weights that `--eval global` and `groups` score."""
        return server_state["weights"]

    # ------------------------------------------------------------------ client side
    def client_update(self, ctx):
        """One client's round: a pure function of its context."""
        model = self.client_model(ctx)
        self.prepare_client(ctx, model)
        metrics = self.train(ctx, model, model.parameters(), self.local_steps(ctx))
        upload = self.upload(ctx, model)
        self.finish_client(ctx, model)
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, {**ctx.metrics, **metrics},
                            ctx.log_lines, artifacts=ctx.artifacts)

    def local_steps(self, ctx):
        """Optimiser steps of a client's round: --num_local_iterations, or with --epochs E,
        E passes over its data, E * ceil(n_k / batch_size) (the last batch of a pass smaller),
        E * floor(n_k / batch_size) with --drop_last (at least one). The privacy probe's
        ctx.override_steps wins over both."""
        if ctx.override_steps is not None:
            return ctx.override_steps
        if self.args.epochs:
            return self.args.epochs * self.batches_per_epoch(ctx.data.num_samples)
        return self.args.num_local_iterations

    def batches_per_epoch(self, num_samples, batch_size=None):
        """Batches in one pass over `num_samples` (PyTorch's DataLoader count, drop_last as --drop_last)."""
        batch_size = batch_size or self.args.batch_size
        if self.args.drop_last:
            return max(1, num_samples // batch_size)
        return math.ceil(num_samples / batch_size)

    def compose_weights(self, architecture, download, state):
        """A client's model weights: its architecture's initial weights, overwritten by the
        weights it kept (state["local_model"]), overwritten by the downloaded weights it has
        (a client of a smaller architecture takes the entries it shares with the global model)."""
        weights = dict(self.setting.initial_weights[architecture])
        for source in (state.get("local_model", {}), download.get("weights", {})):
            for key, value in source.items():
                if key in weights and value.shape != weights[key].shape:
                    raise UsageError(f"a {architecture} client cannot take the server's '{key}' of shape "
                                     f"{list(value.shape)} (its own is {list(weights[key].shape)}): the models "
                                     "share that name but not its shape; give --model a member of "
                                     "--client_models, or a model set whose shared entries fit")
            weights.update((key, value) for key, value in source.items() if key in weights)
        return weights

    def client_model(self, ctx):
        """The client's model for local training, composed as above; sets ctx.global_model
        (when the download holds a whole model of this architecture) and ctx.previous_weights."""
        downloaded = ctx.download.get("weights", {})
        local = self.model("local", ctx.architecture)
        if downloaded.keys() == self.setting.initial_weights[ctx.architecture].keys():
            ctx.global_model = self.frozen_model("global", ctx.architecture, downloaded)
        if self.keeps_local_model:
            ctx.previous_weights = ctx.state.get("local_model", self.setting.initial_weights[ctx.architecture])
        local.load_state_dict(self.compose_weights(ctx.architecture, ctx.download, ctx.state))
        return local

    def receive(self, ctx):
        """What every client that receives the download does with it first, sampled or not,
        before evaluation and local training (e.g. FedALA's adaptive local aggregation into its
        state, FedPer's base written into an unsampled client's state). Default: nothing."""

    def prepare_client(self, ctx, model):
        """Hook before local training (FedHUG's synthesis, MOON's previous model, ...)."""

    def local_loss(self, model, x, y, ctx):
        """The loss of one local step: CE(model(x), y)."""
        return F.cross_entropy(model(x), y)

    def before_optimizer_step(self, model, ctx):
        """Hook between backward and the optimiser step (e.g. a gradient correction or clipping)."""

    def after_optimizer_step(self, model, ctx):
        """Hook right after each optimiser step (SCAFFOLD's weight correction)."""

    def train(self, ctx, model, parameters, steps, loss=None, optimizer=None):
        """The one local training loop: `steps` optimiser steps of `loss` (default local_loss) on
        the client's shuffled, augmented batches. Returns {"train_loss": mean, "steps": steps}.
        Algorithms with phases (head then body, personal then global) call it once a phase."""
        loss = loss or self.local_loss
        stream = ctx.data.stream(ctx.generator) if ctx.override_batch is None else FixedBatch(ctx.override_batch)
        model.train()
        optimizer = optimizer or self.make_optimizer(parameters)
        loss_sum = torch.zeros((), device=self.device)
        for step in range(steps):
            ctx.step = step
            x, y = stream.next()
            value = loss(model, x, y, ctx)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            self.before_optimizer_step(model, ctx)
            optimizer.step()
            self.after_optimizer_step(model, ctx)
            loss_sum += value.detach()          # summed on the device: no sync per step on a GPU
        mean_loss = loss_sum.item() / steps
        if not math.isfinite(mean_loss):
            raise TrainingDiverged(f"round {ctx.round}, client {ctx.client_id}: the local loss became {mean_loss}")
        return {"train_loss": mean_loss, "steps": steps}

    def upload(self, ctx, model):
        """What the client sends: {"weights": its model's state dict}."""
        return {"weights": clone_weights(model.state_dict())}

    def finish_client(self, ctx, model):
        """Update ctx.state after training; with keeps_local_model, keep the trained weights."""
        if self.keeps_local_model:
            ctx.state["local_model"] = clone_weights(model.state_dict())

    # ------------------------------------------------------------------ evaluation
    def evaluation_model(self, ctx):
        """`--eval local`: the model client ctx.client_id reports on its own test split, taken
        after it received the round's download (and ran `receive`) and before it trains
        (PFLlib's timing); or {series: model} (the first series is the headline accuracy).
        ctx.generator is an evaluation generator of its own; ctx.state must not be changed.
        Default: its composed model."""
        return self.frozen_model("evaluation", ctx.architecture,
                                 self.compose_weights(ctx.architecture, ctx.download, ctx.state))

"""FedF2DG (Zhao et al., "Data-free knowledge distillation via generator-free data generation for
Non-IID federated learning", Neural Networks 179:106627, 2024; GTML-LAB/FedF2DG; spec
datafree-hetero-privacy.md section 1): ordinary FL pre-training, then pseudo data made by model
inversion of every client's local model (no generator network), distilled into the global model on
the server, then "Rcompete" rounds that invert again with a competition term.

The reference's four scripts are the stages of one run here, one or more rounds each
(R1 = --pretrain_rounds, the run has --comm_round rounds):

    rounds 0 .. R1-1   pretrain   the base (--base scaffold, the reference's, or fedavg), every
                                  client every round; the server keeps every client's latest model
                                  and the round whose global model scores best on the selection
                                  set (with that round's local models)
    round R1           distil     clients upload their class histograms; the server takes the
                                  selected pre-training round's global model as student and its
                                  local models as teachers, generates --num_batch batches a client
                                  (no competition, --cig_scale 0) and distils
    rounds R1+1 ..     rcompete   round R1+1: every client trains the distilled model locally
                                  (plain local training: the reference's fresh SCAFFOLD control
                                  variates are equal, so no correction) and uploads it: these are
                                  the teachers of every Rcompete round. Each round: one batch a
                                  client (--rcompete_num_batch) inverted with the competition term
                                  (--rcompete_cig_scale 10) against the current global model, distil

Generation budget (utils.get_clients_distribution, compute_client_quality). n_k samples of client k,
s_k = n_k / sum_j n_j, p_kc its class proportions, N_tot = --inversion_batch_size * n_parties:
    first batch (distil stage; first Rcompete round)   N_k = N_tot * s_k
    later batches (and Rcompete rounds after its first)  N_k = N_tot * (q_k / 3 + 2 s_k / 3),
        q = softmax over clients of L_k, L_k = CE of the student (global model) on client k's last
        generated batch
    targets of client k: class c repeated int(p_kc * N_k) times, classes in order; [0] if empty.

Inversion of client k (synthesis.invert; teacher = its local model, student = the global model):
    x ~ N(0, 1), Adam(--di_lr, betas (0.9, 0.999)), --iters_mi steps, each on x rolled by a random
    offset in [-jitter, jitter]^2:
    CE(teacher(x_jit), y) + cig * (1 - clamp(JS'(student, teacher; T = 3), 0, 1))
        + di_var_scale * TV4(x_jit) + r_feature_weight * prior + di_l2_scale * ||x_jit||_2
    the prior (--prior, named in every stage line): bn = DeepInversion's BatchNorm statistics of
    the teacher (needs a model with BatchNorm2d, e.g. simplecnn-mnist-bn); features = the
    per-channel mean and biased variance of the teacher's conv outputs (SimpleCNN: conv1, conv2
    before ReLU) measured by the client on its own unaugmented training data after its local
    training, uploaded with its model (counted as "feature_statistics"); none = no prior (the
    ablation floor); auto = bn when the model has BatchNorm2d, else features.
    The lowest-loss step is kept; x is clamped to the valid pixel box after every step.

Distillation (train_kd.kd, st.SoftTarget, utils.get_softlabel): per client, all its pseudo images
rolled by one fresh random offset, soft labels = its teacher's logits on them (eval mode); the pool
of every client's pairs trains the global model (train mode, so BN statistics move) for --kd_epochs
epochs of shuffled batches of --kd_batch_size:
    loss = kd_scale * T^2 * KL(softmax(t / T) || softmax(s / T)),  kd_scale 1e-3, T 3
SGD(--kd_lr, momentum --kd_momentum, Nesterov (plain SGD at momentum 0), weight decay
--kd_weight_decay) re-created every epoch. After every epoch the model is scored on the selection set; the best (>=) epoch's model is
kept, starting from 0 in the distil stage and from the model before distillation in Rcompete rounds
(so a Rcompete round never lowers the selection score).

Selection (--selection): validation (default) = a seeded hold-out of --validation_size training
samples kept out of every client (engine/data.py, drawn only for this algorithm); test = the
reference's best-on-test selection, labelled "selected on the test set" in every line it affects
(the hold-out is then not drawn: --validation_size is set to 0).

Flags and the source of each default: [F2DG] = GTML-LAB/FedF2DG experiments.get_args and the stage
scripts. The pre-training settings of the reference (SCAFFOLD, 10 clients, Dir(0.05), 5 local epochs,
batch 64, lr 0.01, momentum 0.9, weight decay 1e-5, every client every round) are the shared flags
(--epochs 5 --batch_size 64 --beta 0.05 ...), not changed here.
A setting for a 2-core CPU (about 3 minutes: 10 clients, 20 pre-training rounds of 20 steps):
    python -u fedf2dg.py --dataset fashionmnist --partition noniid --beta 0.05 --n_parties 10 \\
        --num_local_iterations 20 --pretrain_rounds 20 --comm_round 23 --iters_mi 100 \\
        --inversion_batch_size 32 --num_batch 2 --kd_epochs 5
The reference's defaults (2000 steps, 10 batches of 256 a client, 30 KD epochs) are GPU-sized.

Reference differences (decided):
- Best step: the reference keeps `inputs.data` without cloning and so returns the final iterate;
  here the lowest-loss step's inputs, cloned (synthesis.invert), and L_k is taken on them.
- Fashion-MNIST port: shape and class count from the data, pseudo images live in model space and
  are clamped to the valid box [(0 - mean) / std, (1 - mean) / std] after every step (our choice;
  the reference never clamps); the reference has no BN-free path (it crashes at step 200 on a
  model without BatchNorm2d): --prior features / none are ours (spec options (b), (c)).
- Selection on a validation hold-out by default (the reference selects the pre-training round, every
  KD epoch and every Rcompete round on the test set: --selection test).
- One run: stages are rounds; the Rcompete round-0 FedAvg average of the new local models is
  computed and discarded by the reference, not computed here. Generation runs on the server (as the
  reference), so the class histograms (and with --prior features the feature statistics) are
  uploads, counted in the bytes columns. Every client must take part every round (--sample_fraction 1,
  the reference's --sample 1).
- All randomness (initial noise, jitter, the soft-label roll, KD shuffles) from the server's
  generator of the round, so a resumed run repeats exactly.
"""
import math
import sys

import torch
import torch.nn.functional as F

import cvdataset
import synthesis
from engine import ClientResult, Flag, main
from engine.algorithm import clone_weights
from engine.evaluation import count_correct
from fedavg import FedAvg
from models import build_model
from scaffold import SCAFFOLD
from utils import UsageError

F2DG = "GTML-LAB/FedF2DG experiments.get_args"
BASES = {"scaffold": SCAFFOLD, "fedavg": FedAvg}
PRIORS = ("auto", "bn", "features", "none")
SELECTIONS = ("validation", "test")
RCOMPETE_ROUNDS = 10        # Rcompete.sh's comm_round: the default --pretrain_rounds leaves this many at the end
STATISTICS_BATCH = 250      # images a forward pass when measuring feature statistics or soft labels


# ============================================================================ formulas

def client_sample_counts(class_counts, total, losses=None):
    """N_k = total * s_k (no losses: the first batch), else total * (q_k / 3 + 2 s_k / 3) with
    q = softmax(losses); s_k = n_k / sum_j n_j from class_counts [clients, classes]. float64."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    shares = counts.sum(1) / counts.sum()
    if losses is None:
        return total * shares
    quality = torch.softmax(torch.as_tensor(losses, dtype=torch.float64), dim=0)
    return total * (quality / 3 + 2 * shares / 3)


def client_targets(class_counts, samples):
    """Class c repeated int(p_c * samples) times (p = class_counts / their sum), classes in order;
    the single label 0 when that leaves none."""
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    repeats = [int(p * samples) for p in (counts / counts.sum()).tolist()]
    targets = torch.repeat_interleave(torch.arange(len(repeats)), torch.tensor(repeats))
    return targets if len(targets) else torch.zeros(1, dtype=torch.long)


def soft_target_loss(student_logits, teacher_logits, temperature):
    """T^2 * KL(softmax(t / T) || softmax(s / T)), batch mean (st.SoftTarget)."""
    return F.kl_div(F.log_softmax(student_logits / temperature, dim=1), F.softmax(teacher_logits / temperature, dim=1),
                    reduction="batchmean") * temperature ** 2


# ============================================================================ the algorithm

class FedF2DG(FedAvg):
    name = "fedf2dg"
    evaluations = ("global",)
    flags = (
        Flag("base", str, "scaffold", "pre-training algorithm: scaffold or fedavg (FedAvg's flags apply to both)",
             "federated_learning_stage.sh (--alg scaffold)"),
        Flag("pretrain_rounds", int, None, "R1: pre-training rounds; round R1 generates and distils, the rounds "
             "after it are Rcompete rounds (default: --comm_round - 11, so 1 distillation and 10 Rcompete rounds "
             "follow; --scenario fedf2dg's 91 rounds give the reference's 80)",
             "federated_learning_stage.sh comm_round 80 (README copy: 20); Rcompete.sh comm_round 10"),
        Flag("selection", str, "validation", "validation (a hold-out of the training set) or test (the "
             "reference's best-on-test selection, labelled in every line)", "this suite (reference: test)"),
        Flag("validation_size", int, 1000, "training samples held out of every client for --selection validation",
             "this suite"),
        Flag("prior", str, "auto", "inversion prior: bn, features (measured conv statistics, uploaded), none, "
             "or auto (bn when the model has BatchNorm2d, else features)", "spec section 1 options (a)-(c)"),
        Flag("inversion_batch_size", int, 256, "bs: N_tot = bs * n_parties pseudo samples a batch", F2DG + " --bs"),
        Flag("num_batch", int, 10, "generated batches a client in the distil stage", "adaptive_data_generation_stage.sh"),
        Flag("rcompete_num_batch", int, 1, "generated batches a client in a Rcompete round", "Rcompete.sh"),
        Flag("iters_mi", int, 2000, "inversion steps", F2DG),
        Flag("di_lr", float, 0.1, "Adam learning rate of the inverted inputs (betas 0.9, 0.999)", F2DG),
        Flag("di_var_scale", float, 0.001, "weight of the 4-way total variation", F2DG),
        Flag("di_l2_scale", float, 0.0, "weight of the L2 prior ||x||_2", F2DG),
        Flag("r_feature_weight", float, 1.0, "weight of the BN / feature statistic prior", F2DG),
        Flag("cig_scale", float, 0.0, "weight of the competition term in the distil stage",
             "adaptive_data_generation_stage.sh"),
        Flag("rcompete_cig_scale", float, 10.0, "weight of the competition term in Rcompete rounds", "Rcompete.sh"),
        Flag("cig_temperature", float, 3.0, "temperature of the competition term", "deepinversion.get_images (T = 3)"),
        Flag("jitter", int, 2, "inputs rolled by up to this many pixels each step (0: off)",
             "deepinversion.get_images (lim 2)"),
        Flag("kd_epochs", int, 30, "distillation epochs a distillation", F2DG),
        Flag("kd_lr", float, 0.01, "distillation SGD learning rate", F2DG),
        Flag("kd_momentum", float, 0.9, "distillation SGD momentum (Nesterov)", F2DG + " --momentum"),
        Flag("kd_weight_decay", float, 1e-4, "distillation SGD weight decay", F2DG + " --weight_decay"),
        Flag("kd_batch_size", int, 256, "distillation batch size", "train_kd.kd"),
        Flag("kd_temperature", float, 3.0, "distillation temperature T", "train_kd.kd SoftTarget(T=3)"),
        Flag("kd_scale", float, 1e-3, "factor of the distillation loss", "train_kd.kd"),
    )

    @classmethod
    def check_args(cls, args):
        if args.pretrain_rounds is None:
            args.pretrain_rounds = args.comm_round - 1 - RCOMPETE_ROUNDS
            if args.pretrain_rounds < 1:
                raise UsageError(f"--comm_round {args.comm_round} leaves no pre-training round before the distillation "
                                 f"round and the {RCOMPETE_ROUNDS} Rcompete rounds: raise --comm_round or set "
                                 "--pretrain_rounds")
        for flag in ("pretrain_rounds", "inversion_batch_size", "num_batch", "rcompete_num_batch", "iters_mi",
                     "kd_epochs", "kd_batch_size"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag} must be a positive integer (got {getattr(args, flag)})")
        for flag in ("di_lr", "kd_lr", "cig_temperature", "kd_temperature"):
            if not getattr(args, flag) > 0:
                raise UsageError(f"--{flag} must be > 0 (got {getattr(args, flag)})")
        for flag, choices in (("base", BASES), ("prior", PRIORS), ("selection", SELECTIONS)):
            if getattr(args, flag) not in choices:
                raise UsageError(f"--{flag} must be one of {', '.join(choices)} (got {getattr(args, flag)})")
        for flag in ("jitter", "kd_momentum", "kd_weight_decay"):
            if not getattr(args, flag) >= 0:
                raise UsageError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
        if args.comm_round < args.pretrain_rounds + 1:
            raise UsageError(f"--comm_round {args.comm_round} leaves no round for generation and distillation: "
                             f"FedF2DG needs at least --pretrain_rounds + 1 = {args.pretrain_rounds + 1}")
        if args.sample_fraction != 1.0:
            raise UsageError("FedF2DG needs every client every round (the reference's --sample 1): "
                             "use --sample_fraction 1")
        if args.client_models:
            raise UsageError("FedF2DG inverts local models of the global model's architecture: drop --client_models")
        if args.load_path:
            raise UsageError("FedF2DG runs its stages in one run: --load_path is not supported (continue with --resume)")
        if args.prior == "bn" and not has_batch_norm(args.model):
            raise UsageError(f"--prior bn needs BatchNorm2d layers and {args.model} has none: use --model "
                             "simplecnn-mnist-bn, or --prior features")
        if args.selection == "test":
            args.validation_size = 0        # no hold-out: the clients keep the whole training set
        elif args.validation_size < 1:
            raise UsageError(f"--selection validation needs --validation_size >= 1 (got {args.validation_size})")

    def __init__(self, setting):
        super().__init__(setting)
        a = self.args
        self.pretraining = BASES[a.base](setting)
        self.prior = a.prior if a.prior != "auto" else ("bn" if has_batch_norm(a.model) else "features")
        self._held_out = setting.held_out

    # ------------------------------------------------------------------ the schedule
    def stage(self, round_index):
        r1 = self.args.pretrain_rounds
        return "pretrain" if round_index < r1 else "distil" if round_index == r1 else "rcompete"

    def trains_teachers(self, round_index):
        """Round R1 + 1: the clients train the Rcompete teachers."""
        return round_index == self.args.pretrain_rounds + 1

    def selected_on(self):
        return "on the validation hold-out" if self.args.selection == "validation" else "on the test set"

    # ------------------------------------------------------------------ server state
    def init_server(self, initial_weights):
        """The base's state and: next_round (which stage the downloads serve), every client's latest
        model (and feature statistics), the selected pre-training round (best), the class
        histograms, the Rcompete teachers and the student's losses L_k."""
        server_state = self.pretraining.init_server(initial_weights)
        server_state.update(next_round=0, client_models={}, feature_statistics={}, best={},
                            teachers={}, teacher_statistics={}, student_losses={})
        return server_state

    def initialise_server(self, server_state, contexts, server):
        a, r1 = self.args, self.args.pretrain_rounds
        held_out = (f"a hold-out of {a.validation_size} training samples" if a.selection == "validation"
                    else "the test set (the reference's selection)")
        server.log(f"fedf2dg: stages pretrain ({a.base}) rounds 0-{r1 - 1}, distil round {r1}, rcompete rounds "
                   f"{r1 + 1}-{a.comm_round - 1}; prior {self.prior}; model selection on {held_out}")
        return server_state

    def download(self, server_state, client_id):
        """Pre-training: the base's download; the teachers' round: the global model; else nothing."""
        round_index = server_state["next_round"]
        if self.stage(round_index) == "pretrain":
            return self.pretraining.download(server_state, client_id)
        if self.trains_teachers(round_index):
            return {"weights": server_state["weights"]}
        return {}

    # ------------------------------------------------------------------ client side
    def client_update(self, ctx):
        """The base's update (pre-training), plain local training (the teachers' round), the class
        histogram (distil round) or nothing; with --prior features every uploaded model comes with
        the statistics of its conv outputs on the client's data."""
        stage = self.stage(ctx.round)
        if stage == "pretrain":
            result = self.pretraining.client_update(ctx)
        elif self.trains_teachers(ctx.round):
            result = super().client_update(ctx)
        else:
            result = ClientResult(ctx.client_id, ctx.data.num_samples, {}, ctx.state, {}, ctx.log_lines)
        if stage == "distil":
            result.upload["class_counts"] = ctx.data.class_counts.clone()
        if self.prior == "features" and "weights" in result.upload:
            result.upload["feature_statistics"] = self.measure_statistics(ctx, result.upload["weights"])
        return result

    def measure_statistics(self, ctx, weights):
        """synthesis.feature_statistics of the client's trained model on its whole unaugmented
        training data, in order (no random draw)."""
        model = self.frozen_model("statistics", ctx.architecture, weights)
        data = ctx.data
        batches = ((cvdataset.normalise(data.images[i:i + STATISTICS_BATCH], data.mean, data.std), None)
                   for i in range(0, data.num_samples, STATISTICS_BATCH))
        return synthesis.feature_statistics(model, batches)

    # ------------------------------------------------------------------ server side
    def server_update(self, server_state, results, server):
        stage, a = self.stage(server.round), self.args
        if stage == "pretrain":
            server_state = self.pretrain_update(server_state, results, server)
        else:
            if stage == "distil":
                best = server_state["best"]
                server_state["class_counts"] = torch.stack([r.upload["class_counts"] for r in results]).cpu()
                server_state["weights"] = best["weights"]
                teachers, statistics = best["client_models"], best["feature_statistics"]
                batches, cig, start, losses = a.num_batch, a.cig_scale, None, None
                source = f"pre-training round {best['round']}"
            else:
                if self.trains_teachers(server.round):
                    server_state["teachers"] = {r.client_id: r.upload["weights"] for r in results}
                    server_state["teacher_statistics"] = {r.client_id: r.upload["feature_statistics"]
                                                          for r in results if "feature_statistics" in r.upload}
                    losses = None
                else:
                    losses = [server_state["student_losses"][k] for k in sorted(server_state["teachers"])]
                teachers, statistics = server_state["teachers"], server_state["teacher_statistics"]
                batches, cig = a.rcompete_num_batch, a.rcompete_cig_scale
                start = self.score(server_state["weights"])
                source = "the current global model"
            images, targets, logits, losses = self.generate(server_state, teachers, statistics, batches, cig, losses,
                                                            server)
            if stage == "distil" or server.round == a.comm_round - 1:
                server.artifacts["synthetic"] = synthesis.picture_samples(images, targets, self.num_classes)
            server_state["student_losses"] = dict(zip(sorted(teachers), losses))
            server_state["weights"], score, epoch = self.distil(server_state["weights"], images, logits, start, server)
            start_text = "0" if start is None else f"{start:.5f}"
            server.log(f"fedf2dg round {server.round}: stage {stage}, prior {self.prior}, student {source}, "
                       f"{len(images)} pseudo samples ({batches} batch{'es' if batches > 1 else ''} a client, "
                       f"competition {cig:g}); distilled {a.kd_epochs} epochs: best accuracy {score:.5f} "
                       f"({f'epoch {epoch}' if epoch else 'no epoch better: the model before kept'}; start {start_text}) "
                       f"selected {self.selected_on()}")
        server_state["next_round"] = server.round + 1
        server.metrics.update(stage=stage, prior=self.prior, selection=a.selection)
        return server_state

    def pretrain_update(self, server_state, results, server):
        """The base's aggregation; keep every client's model; keep the best-scoring round."""
        server_state = self.pretraining.server_update(server_state, results, server)
        for r in results:
            server_state["client_models"][r.client_id] = r.upload["weights"]
            if "feature_statistics" in r.upload:
                server_state["feature_statistics"][r.client_id] = r.upload["feature_statistics"]
        score, best = self.score(server_state["weights"]), server_state["best"]
        if not best or score > best["accuracy"]:
            best = server_state["best"] = {"accuracy": score, "round": server.round,
                                           "weights": clone_weights(server_state["weights"]),
                                           "client_models": dict(server_state["client_models"]),
                                           "feature_statistics": dict(server_state["feature_statistics"])}
        server.log(f"fedf2dg round {server.round}: stage pretrain ({self.args.base}), prior {self.prior}, "
                   f"accuracy {score:.5f}, best {best['accuracy']:.5f} (round {best['round']}) selected "
                   f"{self.selected_on()}")
        return server_state

    # ------------------------------------------------------------------ generation
    def generate(self, server_state, teachers, statistics, batches, cig_scale, losses, server):
        """`batches` rounds of inverting every teacher (client order) for its targets, with the
        global model as student; then the soft labels. Returns (pooled images, pooled teacher
        targets, pooled teacher logits, the student's CE L_k on each client's last batch)."""
        a, clients = self.args, sorted(teachers)
        class_counts = server_state["class_counts"][clients]
        box = synthesis.valid_box(self.held_out()["mean"], self.held_out()["std"], self.device)
        terms = synthesis.InversionTerms(prior=a.r_feature_weight if self.prior != "none" else 0.0,
                                         competition=cig_scale, competition_temperature=a.cig_temperature,
                                         total_variation=a.di_var_scale, l2=a.di_l2_scale)
        student = self.frozen_model("student", a.model, server_state["weights"])
        pseudo, pseudo_targets = {k: [] for k in clients}, {k: [] for k in clients}
        for batch in range(batches):
            sizes = client_sample_counts(class_counts, a.inversion_batch_size * len(clients), losses)
            losses = []
            for k, counts, size in zip(clients, class_counts, sizes.tolist()):
                targets = client_targets(counts, size).to(self.device)
                teacher = self.frozen_model("teacher", a.model, teachers[k])
                prior = (synthesis.BNStatisticLoss(teacher) if self.prior == "bn" else
                         synthesis.FeatureStatisticLoss(teacher, statistics[k]) if self.prior == "features" else None)
                best = synthesis.invert(teacher, student, targets, self.image_shape, server.generator, a.iters_mi,
                                        a.di_lr, terms, betas=(0.9, 0.999), jitter_limit=a.jitter, box=box,
                                        prior=prior)
                with torch.no_grad():
                    losses.append(F.cross_entropy(student(best.inputs), targets).item())
                pseudo[k].append(best.inputs)
                pseudo_targets[k].append(targets)
            server.log(f"fedf2dg round {server.round} batch {batch}: samples per client "
                       f"[{' '.join(str(len(pseudo[k][-1])) for k in clients)}], student CE "
                       f"[{' '.join(f'{loss:.3f}' for loss in losses)}]")
        images, logits = [], []
        for k in clients:
            rolled = synthesis.jitter(torch.cat(pseudo[k]), synthesis.jitter_offsets(server.generator, a.jitter))
            teacher = self.frozen_model("teacher", a.model, teachers[k])
            with torch.no_grad():
                logits.append(torch.cat([teacher(rolled[i:i + STATISTICS_BATCH])
                                         for i in range(0, len(rolled), STATISTICS_BATCH)]))
            images.append(rolled)
        targets = torch.cat([t for k in clients for t in pseudo_targets[k]])
        return torch.cat(images), targets, torch.cat(logits), losses

    # ------------------------------------------------------------------ distillation
    def distil(self, weights, images, logits, start, server):
        """--kd_epochs epochs of soft_target_loss on the pool (global model in train mode, SGD
        re-created every epoch); returns (the best (>=) epoch's weights, its score, its epoch),
        the best starting at `start` with `weights` (None: 0, the first epoch wins)."""
        a = self.args
        model = self.model("distil", a.model)
        model.load_state_dict(weights)
        model.requires_grad_(True)
        best_weights, best_score, best_epoch = clone_weights(weights), (start if start is not None else 0.0), 0
        pool = cvdataset.ShuffledBatches((images, logits), a.kd_batch_size, server.generator)
        steps = math.ceil(len(images) / a.kd_batch_size)
        for epoch in range(1, a.kd_epochs + 1):
            optimizer = torch.optim.SGD(model.parameters(), lr=a.kd_lr, momentum=a.kd_momentum, nesterov=a.kd_momentum > 0,
                                        weight_decay=a.kd_weight_decay)
            model.train()
            for _ in range(steps):
                x, teacher_logits = pool.next()
                loss = a.kd_scale * soft_target_loss(model(x), teacher_logits, a.kd_temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            score = self.score(model.state_dict())
            if score >= best_score:
                best_weights, best_score, best_epoch = clone_weights(model.state_dict()), score, epoch
        return best_weights, best_score, best_epoch

    # ------------------------------------------------------------------ selection
    def held_out(self):
        """The server's data (Setting.held_out): the validation hold-out, the test set and the
        normalisation."""
        return self._held_out

    def score(self, weights):
        """Accuracy of a global model on the selection set (--selection)."""
        held_out = self.held_out()
        images, labels = held_out[self.args.selection]
        model = self.frozen_model("selection", self.args.model, weights)
        correct = count_correct(model, images.to(self.device), labels.to(self.device), held_out["mean"], held_out["std"])
        return correct / len(labels)


def has_batch_norm(architecture):
    return any(isinstance(m, torch.nn.BatchNorm2d) for m in build_model(architecture, 10).modules())


if __name__ == "__main__":
    sys.exit(main(FedF2DG))

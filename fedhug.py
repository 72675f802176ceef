"""FedHUG: FedAvg plus heterogeneity- and uncertainty-guided data synthesis (SPEC section 6).

Rounds before --start_round are plain FedAvg. From then on each sampled client k, with
net = its local model from its last round (the run's initial model if it never trained) and
global = the current global model (formulas in synthesis.py):

    drift    = ||net - global|| / ||global||
    budget   = max(C, floor(synthesis_batch_size * clamp(1 + alpha * drift, min, max) + 0.5))
    e_c      = net's mean entropy on its data of class c, min-max normalised to [0, 1]
    d_c      = scarcity_c + beta_u * e_c * (max scarcity + 1), normalised
    targets  = class c repeated floor(budget * d_c) times
    x, t     = inputs optimised so that the global model (teacher) predicts the targets while
               net (student) is uncertain and near its decision boundary; t = teacher logits on x
    loss     = real_w * CE(real batch) + syn_w * T^2 * KL(softmax(t/T) || softmax(model(x)/T))
    real_w   = N_k / (N_k + sum_c (n_max - n_c)),  syn_w = 1 - real_w

    python -u fedhug.py --dataset fashionmnist --gpu 0 --partition noniid --beta 0.1 \\
        --model simplecnn-mnist --n_parties 10 --sample_fraction 1.0 \\
        --num_local_iterations 100 --start_round 50 --comm_round 70 --save_model
"""
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import cvdataset
import synthesis
from engine import Flag, main
from fedavg import FedAvg
from utils import UsageError, derived_seed

PUBLISHED = "the published FedHUG code (SPEC section 6)"
MAX_BUDGET = 1_000_000    # synthesised samples a client may ask for (3 GB of 28x28 fp32 images)


@dataclass
class Distillation:
    """One client's synthesis for this round, kept on its context as `ctx.distillation`:
    what local training mixes into its loss."""
    targets: torch.Tensor          # the class of every synthetic sample
    real_weight: float
    syn_weight: float
    batches: cvdataset.ShuffledBatches   # (inputs, teacher logits)


class FedHUG(FedAvg):
    name = "fedhug"
    keeps_local_model = True    # net = theta_k^{t-1}, the student and the drift's reference
    flags = (
        Flag("start_round", int, 50, "first round with synthesis (rounds before are FedAvg)", PUBLISHED),
        Flag("g_steps", int, 500, "synthesis steps", PUBLISHED),
        Flag("lr_g", float, 0.01, "Adam learning rate of the synthesised inputs", PUBLISHED),
        Flag("synthesis_batch_size", int, 256, "base synthesis budget", PUBLISHED),
        Flag("bn", float, 0.0, "weight of the BN-statistic loss", PUBLISHED),
        Flag("oh", float, 1.0, "weight of the teacher's cross-entropy", PUBLISHED),
        Flag("ua_uncertainty_beta", float, 1.0, "weight beta_u of the entropy in the class distribution", PUBLISHED),
        Flag("ua_entropy_batches", int, 2, "batches of client data for the per-class entropy", PUBLISHED),
        Flag("ua_budget_alpha", float, 1.0, "budget scale = 1 + alpha * drift", PUBLISHED),
        Flag("ua_budget_min_scale", float, 0.5, "lower clamp of the budget scale", PUBLISHED),
        Flag("ua_budget_max_scale", float, 2.0, "upper clamp of the budget scale", PUBLISHED),
        Flag("ua_entropy_weight", float, 0.3, "weight of the student's entropy in synthesis", PUBLISHED),
        Flag("ua_boundary_lambda", float, 0.1, "weight of the student's top-1/top-2 margin in synthesis", PUBLISHED),
        Flag("T", float, 1.0, "distillation temperature", PUBLISHED),
        Flag("double_gen", bool, False, "re-synthesise once halfway through local training", PUBLISHED),
        Flag("synthesis_bf16", bool, False, "bf16 autocast in synthesis (faster on CPUs with bf16 units; "
             "other numbers)", "this suite (off: fp32 as published)"),
        Flag("plain_inversion_samples", int, 0, "diagnostics: also invert this many of the round's targets without "
             "the entropy and margin terms (plain inversion, same steps; own random stream) and record the "
             "student's entropy and margin on them (0: off)", "this suite"),
    )

    @classmethod
    def check_args(cls, args):
        for flag in ("g_steps", "synthesis_batch_size"):
            if getattr(args, flag) < 1:
                raise UsageError(f"--{flag} must be a positive integer (got {getattr(args, flag)})")
        for flag in ("lr_g", "T"):
            if not getattr(args, flag) > 0:
                raise UsageError(f"--{flag} must be > 0 (got {getattr(args, flag)})")
        largest = args.synthesis_batch_size * max(args.ua_budget_min_scale, args.ua_budget_max_scale)
        if largest > MAX_BUDGET:
            raise UsageError(f"--synthesis_batch_size {args.synthesis_batch_size} x budget scale up to "
                             f"{max(args.ua_budget_min_scale, args.ua_budget_max_scale):g} allows {largest:.3g} "
                             f"synthesised samples a client, more than {MAX_BUDGET:,}; lower either")
        if args.plain_inversion_samples < 0:
            raise UsageError(f"--plain_inversion_samples must be >= 0 (got {args.plain_inversion_samples})")
        if args.start_round < 0:
            raise UsageError(f"--start_round must be >= 0 (got {args.start_round})")
        if args.start_round > args.comm_round:
            raise UsageError(f"--start_round {args.start_round} exceeds --comm_round {args.comm_round}: "
                             "FedHUG would never synthesise; lower --start_round or raise --comm_round")
        units = cpu_bf16_units()
        if units and not args.synthesis_bf16 and args.start_round < args.comm_round and (
                args.device == "cpu" or not torch.cuda.is_available()):
            print(f"hint: this CPU has bf16 units ({', '.join(units)}): --synthesis_bf16 made FedHUG's synthesis "
                  "about 2x faster on one such CPU, with other numbers (off by default: fp32 as published; "
                  "python bench/bench_fedhug.py measures both here)", file=sys.stderr)

    def prepare_client(self, ctx, model):
        """Steps 1-5 of SPEC section 6: drift, budget, class distribution, loss weights, synthesis."""
        a = self.args
        if ctx.round < a.start_round:
            return
        self.previous_model = self.frozen_model("previous", ctx.architecture, ctx.previous_weights)
        drift = synthesis.drift(ctx.previous_weights, ctx.download["weights"])
        budget = synthesis.synthesis_budget(drift, a.synthesis_batch_size, a.ua_budget_alpha,
                                            a.ua_budget_min_scale, a.ua_budget_max_scale, self.num_classes)
        entropy = synthesis.per_class_entropy(self.previous_model, self.entropy_batches(ctx), self.num_classes)
        distribution = synthesis.class_distribution(ctx.data.class_counts, entropy, a.ua_uncertainty_beta)
        targets = synthesis.synthesis_targets(distribution, budget).to(self.device)
        real_weight, syn_weight = synthesis.loss_weights(ctx.data.class_counts)
        batches = self.synthesize(ctx, targets, student=self.previous_model)
        ctx.distillation = Distillation(targets, real_weight, syn_weight, batches)
        ctx.metrics.update(drift=drift, budget=budget, synthesised=len(targets),
                           samples_per_class=torch.bincount(targets, minlength=self.num_classes).tolist(),
                           **synthesis_diagnostics(*batches.tensors, targets, self.previous_model))
        if a.plain_inversion_samples:
            ctx.metrics.update(self.plain_inversion(ctx, targets))
        if ctx.round in (a.start_round, a.comm_round - 1):
            ctx.artifacts["synthetic"] = synthesis.picture_samples(batches.tensors[0], targets, self.num_classes)
        ctx.log(f"fedhug client {ctx.client_id}: drift {drift:.4f}, budget {budget} ({len(targets)} synthesised), "
                f"weights real {real_weight:.3f} syn {syn_weight:.3f}, "
                f"class distribution [{' '.join(f'{d:.2f}' for d in distribution.tolist())}]")

    def entropy_batches(self, ctx):
        """--ua_entropy_batches shuffled, un-augmented batches of the client's training data."""
        stream = ctx.data.stream(ctx.generator, augment=False)
        return [stream.next() for _ in range(self.args.ua_entropy_batches)]

    def synthesize(self, ctx, targets, student):
        """The synthetic set: inputs inverted from the global model (teacher) against `student`,
        with the teacher's logits on them, served as shuffled batches."""
        a = self.args
        inputs, teacher_logits = synthesis.synthesize(
            ctx.global_model, student, targets, self.image_shape, ctx.generator, a.g_steps, a.lr_g,
            a.bn, a.oh, a.ua_entropy_weight, a.ua_boundary_lambda, bf16=a.synthesis_bf16)
        return cvdataset.ShuffledBatches((inputs, teacher_logits), a.batch_size, ctx.generator)

    def plain_inversion(self, ctx, targets):
        """Diagnostics: --plain_inversion_samples of the targets (evenly spaced, so the class mix is
        kept) inverted as FedHUG does but without the entropy and margin terms, from a random stream
        of their own (the run's numbers are unchanged); the same figures, prefixed "plain_"."""
        a = self.args
        chosen = targets[torch.linspace(0, len(targets) - 1, min(a.plain_inversion_samples, len(targets))).long()]
        generator = torch.Generator().manual_seed(derived_seed(a.init_seed, ctx.round, ctx.client_id, "plain"))
        inputs, teacher_logits = synthesis.synthesize(
            ctx.global_model, self.previous_model, chosen, self.image_shape, generator, a.g_steps, a.lr_g,
            a.bn, a.oh, 0.0, 0.0, bf16=a.synthesis_bf16)
        return {f"plain_{k}": v for k, v in synthesis_diagnostics(inputs, teacher_logits, chosen,
                                                                   self.previous_model).items()}

    def local_loss(self, model, x, y, ctx):
        """real_w * CE(model(x), y) + syn_w * T^2 * KL(softmax(t/T) || softmax(model(x_syn)/T))."""
        a = self.args
        if ctx.round < a.start_round:
            return super().local_loss(model, x, y, ctx)
        distillation = ctx.distillation
        if a.double_gen and ctx.step == self.local_steps(ctx) // 2:
            distillation.batches = self.synthesize(ctx, distillation.targets, student=model)
        syn_x, teacher_logits = distillation.batches.next()
        kd = F.kl_div(F.log_softmax(model(syn_x) / a.T, dim=1), F.softmax(teacher_logits / a.T, dim=1),
                      reduction="batchmean") * a.T ** 2
        return distillation.real_weight * F.cross_entropy(model(x), y) + distillation.syn_weight * kd


@torch.no_grad()
def synthesis_diagnostics(inputs, teacher_logits, targets, student):
    """What the synthetic samples are (issue 18's diagnostics): how often the teacher (global
    model) predicts their target (teacher_agreement), and the student's (the client's previous
    model, eval mode) mean entropy and mean top-1/top-2 margin on them: the guided inversion
    aims at high entropy and low margin."""
    student_logits = student(inputs)
    return {"teacher_agreement": (teacher_logits.argmax(1) == targets).float().mean().item(),
            "student_entropy": synthesis.softmax_entropy(student_logits).mean().item(),
            "student_margin": synthesis.top1_top2_margin(student_logits).mean().item()}


def cpu_bf16_units():
    """The bf16 instruction sets this CPU lists (Linux /proc/cpuinfo: amx_bf16, avx512_bf16); [] elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return [unit for unit in ("amx_bf16", "avx512_bf16") if unit in flags]


if __name__ == "__main__":
    sys.exit(main(FedHUG))

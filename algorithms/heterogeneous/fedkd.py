"""FedKD (Wu, Wu, Lyu, Huang and Xie 2022, "Communication-efficient federated learning via
knowledge distillation", Nature Communications 13, 2032): every client keeps a personal mentor M_k
(any architecture) and trains it together with a shared mentee m (one architecture for all) by
adaptive mutual distillation of logits and hidden features; only the mentee travels, as truncated
SVD factors whose rank keeps a growing share of the spectrum's energy.

A client's round, on every batch (x, y), with z_M, z_m the two models' features, W_h in R^{D_M x D_m}
(no bias, personal) mapping the mentee's features to the mentor's, t = CE(M(x), y), s = CE(m(x), y):

    L_M = t + KL_t(softmax(m(x)) || softmax(M(x))) / (t + s) + MSE(z_M, W_h z_m) / (t + s)
    L_m = s + KL_t(softmax(M(x)) || softmax(m(x))) / (t + s) + MSE(z_M, W_h z_m) / (t + s)

with the other network's outputs fixed (detached) targets and (t + s) a detached scale, so M steps
on the gradient of L_M, m and W_h on that of L_m: one backward of L_M + L_m, each of M, m, W_h
clipped to gradient norm 10 on its own, one SGD step (M and W_h at --lr, m at --kd_mentee_lr;
--optimizer/--momentum/--reg for all). KL_t averages over all B * C elements (torch KLDivLoss's
default), MSE over all B * D_M elements.

Compression (both directions) of the mentee's parameters (named_parameters; buffers stay with the
client): every tensor with >= 2 dimensions and shape[0] > 1 travels as a truncated SVD over its
last two dimensions (a 4-D conv weight [o, i, k, k]: one SVD per k x k slice, one rank for all),
    U [..., m, r], S [..., r], V [..., r, n],  reconstructed as (U * S[..., None, :]) @ V,
keeping the smallest r in 1..n-1 with  sum_{j<r} sigma_j^2 > T * sum_j sigma_j^2  (sigma^2 summed over
the slices for each index j), all n when no such r exists; other tensors (biases) travel raw, and
so does a tensor whose singular values are all zero. The energy share grows over the rounds:
    T_i = T_start + (i / R) (T_end - T_start),   i = 0..R-1 the round, R = --comm_round
(the reference's schedule: T_start at round 0, updated after each round, for clients and server).

    upload    the mentee compressed at T_i: {"factors": {name: {u, s, v}}, "raw": {name: tensor}}
    server    reconstruct every upload, unweighted mean over the uploaders, compress it at T_i
    download  the compressed global mentee to every receiving client (nothing before round 0's
              aggregation: clients start from the run's initial mentee); the client reconstructs
              it into its mentee
    reported  the mentor M_k (--eval local)

The mentee's architecture is client 0's (HtFLlib's BaseHeadSplit(args, 0)). W_h starts from one
seeded draw for every client (the reference seeds torch with 0 before every client's W_h), with
PyTorch's Linear initialisation. The mentor and W_h live in the client's state
("local_model", "hidden_map"). D_M and D_m may differ, so any --client_models set works.

Flags:
  --kd_mentee_lr 0.01     the mentee's learning rate; HtFLlib system/main.py `-mlr` 0.01 (PFLlib
                          main.py 0.005); HtFLlib total.sh `-mlr 0.01`
  --kd_energy_start 0.95  T_start; HtFLlib and PFLlib main.py `-Ts` 0.95, total.sh `-Ts 0.95`
  --kd_energy_end 0.98    T_end; `-Te` 0.98, total.sh `-Te 0.98`

HtFLlib trains at lr 0.01 (pass --lr 0.01).

Sources: HtFLlib system/flcore/clients/clientkd.py (decomposition, recover), servers/serverkd.py;
PFLlib the same maths (spec/pfl-htfl.md section 3, "FedKD").

Reference differences:
- Targets detached, scale detached (gradients do not cross between the networks): the reference
  back-propagates L_M + L_m undetached, so every network also gets the gradient of the other's KL
  term, of the scale 1 / (t + s), and of the hidden term twice (L_h and L_h_g are the same term).
  Here the hidden term reaches M once (through L_M) and m and W_h once (through L_m).
- Rank: the reference keeps r = 0 when no r < n passes the energy test (flat spectra, e.g. a fresh
  [10, 512] head at T = 0.95), sending the tensor as zeros; here the tensor keeps all n singular
  values. The reference decodes any 3-element entry as (u, sigma, v), so a raw tensor with first
  dimension 3 is mis-decoded; here factors and raw tensors travel under their own names.
- The reference factorises every eligible tensor even when its factors are larger than the tensor
  (a k x k conv slice at full rank; a [10, 84] head at rank 10: 950 floats for 850). Reproduced,
  so the bytes counted are the reference's.
- W_h maps D_m -> D_M (the reference's Linear(D, D) assumes one feature size for both).
- The T schedule uses the --comm_round of the current invocation (a resume that extends a run
  changes T from there on).
"""
import sys

import torch
import torch.nn.functional as F
from torch import nn

from algorithms.heterogeneous.fml import Networks, mutual_kl
from algorithms.heterogeneous.common import feature_dim
from algorithms.personalised.common import seeded_reset_
from engine import Algorithm, ClientResult, Flag, clone_weights, main, weighted_average
from utils import UsageError, derived_seed

HTFLLIB = "HtFLlib system/main.py"


# ============================================================================ SVD compression

def energy_rank(singular_values, energy):
    """The smallest r in 1..n-1 with sum_{j<r} sigma_j^2 > energy * sum_j sigma_j^2 (sigma^2 summed
    over any leading slice dimensions for each index j); n when there is none."""
    per_index = singular_values.pow(2).reshape(-1, singular_values.shape[-1]).sum(0)
    passing = (per_index.cumsum(0)[:-1] > energy * per_index.sum()).nonzero()
    return int(passing[0]) + 1 if len(passing) else len(per_index)


def factorisable(tensor):
    """The reference's test: at least 2 dimensions and a first dimension above 1."""
    return tensor.dim() >= 2 and tensor.shape[0] > 1


def compress(weights, energy):
    """{"factors": {name: {"u", "s", "v"}}, "raw": {name: tensor}}: truncated SVDs at `energy` of
    the factorisable tensors (see the module docstring), the others as they are."""
    factors, raw = {}, {}
    for name, tensor in weights.items():
        tensor = tensor.detach()
        if not factorisable(tensor):
            raw[name] = tensor.clone()
            continue
        u, s, v = torch.linalg.svd(tensor, full_matrices=False)
        if not s.abs().sum() > 0:
            raw[name] = tensor.clone()
            continue
        r = energy_rank(s, energy)
        factors[name] = {"u": u[..., :r].contiguous(), "s": s[..., :r].contiguous(), "v": v[..., :r, :].contiguous()}
    return {"factors": factors, "raw": raw}


def reconstruct(compressed):
    """{name: tensor} from compress's output: (U * S[..., None, :]) @ V, raw tensors as they are."""
    weights = {name: (f["u"] * f["s"][..., None, :]) @ f["v"] for name, f in compressed.get("factors", {}).items()}
    weights.update(compressed.get("raw", {}))
    return weights


# ============================================================================ the algorithm

class FedKD(Algorithm):
    name = "fedkd"
    flags = (
        Flag("kd_mentee_lr", float, 0.01, "FedKD: learning rate of the shared mentee (the mentor and W_h use "
             "--lr)", f"{HTFLLIB} (-mlr, default 0.01; PFLlib 0.005); total.sh -mlr 0.01"),
        Flag("kd_energy_start", float, 0.95, "FedKD: share of the singular values' energy the SVD keeps at "
             "round 0", f"{HTFLLIB} (-Ts, default 0.95); total.sh -Ts 0.95"),
        Flag("kd_energy_end", float, 0.98, "FedKD: the energy share approached at the last round (grows "
             "linearly)", f"{HTFLLIB} (-Te, default 0.98); total.sh -Te 0.98"),
    )
    evaluations = ("local",)    # every client reports its mentor
    keeps_local_model = True    # state["local_model"]: the mentor M_k, never uploaded

    @classmethod
    def check_args(cls, args):
        if args.kd_mentee_lr <= 0:
            raise UsageError(f"--kd_mentee_lr must be > 0 (got {args.kd_mentee_lr})")
        for flag in ("kd_energy_start", "kd_energy_end"):
            if not 0 < getattr(args, flag) <= 1:
                raise UsageError(f"--{flag} must be in (0, 1] (got {getattr(args, flag)})")

    def __init__(self, setting):
        super().__init__(setting)
        self._hidden_maps = {}

    def mentee_architecture(self):
        """The shared model's architecture: client 0's (HtFLlib's models[0])."""
        return self.architecture(0)

    def energy(self, round_index):
        """T_i = T_start + (i / R) (T_end - T_start)."""
        a = self.args
        return a.kd_energy_start + round_index / a.comm_round * (a.kd_energy_end - a.kd_energy_start)

    # ------------------------------------------------------------------ server
    def initialise_server(self, server_state, contexts, server):
        server.log(f"fedkd reports each client's mentor on its own test split; the shared mentee is "
                   f"{self.mentee_architecture()} (client 0's architecture)")
        return server_state

    def init_server(self, initial_weights):
        """No global model before round 0's aggregation (clients start from the initial mentee)."""
        return {"weights": {}}

    def download(self, server_state, client_id):
        """The compressed global mentee, once there is one."""
        return {kind: server_state[kind] for kind in ("factors", "raw") if kind in server_state}

    def server_update(self, server_state, results, server):
        """Reconstruct, average unweighted, compress at this round's energy."""
        mean = weighted_average([reconstruct(r.upload) for r in results], [1] * len(results))
        server_state.update(compress(mean, self.energy(server.round)))
        return server_state

    # ------------------------------------------------------------------ client
    def mentee(self, ctx):
        """The mentee: the run's initial mentee, overwritten by the reconstructed download and by
        the client's own mentee buffers (none in the suite's models)."""
        mentee = self.model("mentee", self.mentee_architecture())
        weights = dict(self.setting.initial_weights[self.mentee_architecture()])
        weights.update(reconstruct(ctx.download))
        weights.update(ctx.state.get("mentee_buffers", {}))
        mentee.load_state_dict(weights)
        return mentee

    def hidden_map(self, ctx, mentor, mentee):
        """W_h: Linear(D_m -> D_M, no bias), from the client's state or the seeded initial draw."""
        shape = (feature_dim(mentor), feature_dim(mentee))
        if shape not in self._hidden_maps:
            self._hidden_maps[shape] = torch.nn.utils.skip_init(nn.Linear, shape[1], shape[0], bias=False,
                                                                device=self.device)
        hidden_map = self._hidden_maps[shape]
        if "hidden_map" in ctx.state:
            hidden_map.load_state_dict(ctx.state["hidden_map"])
        else:
            seeded_reset_(hidden_map, torch.Generator().manual_seed(derived_seed(self.args.init_seed, "fedkd W_h")))
        return hidden_map

    def distillation_loss(self, networks, x, y, ctx):
        """L_M + L_m (targets and scale detached: each network gets the gradient of its own loss)."""
        mentor_features, mentee_features = networks.mentor.features(x), networks.mentee.features(x)
        mentor_logits = networks.mentor.classifier(mentor_features)
        mentee_logits = networks.mentee.classifier(mentee_features)
        mentor_ce, mentee_ce = F.cross_entropy(mentor_logits, y), F.cross_entropy(mentee_logits, y)
        scale = (mentor_ce + mentee_ce).detach()
        mapped = networks.hidden_map(mentee_features)
        mentor_loss = mentor_ce + (mutual_kl(mentor_logits, mentee_logits)
                                   + F.mse_loss(mentor_features, mapped.detach())) / scale
        mentee_loss = mentee_ce + (mutual_kl(mentee_logits, mentor_logits)
                                   + F.mse_loss(mentor_features.detach(), mapped)) / scale
        return mentor_loss + mentee_loss

    def before_optimizer_step(self, networks, ctx):
        networks.clip_each()

    def client_update(self, ctx):
        """Distil mentor and mentee into each other; keep the mentor and W_h; upload the mentee's factors."""
        mentor = self.client_model(ctx)
        mentee = self.mentee(ctx)
        hidden_map = self.hidden_map(ctx, mentor, mentee)
        networks = Networks(mentor=mentor, mentee=mentee, hidden_map=hidden_map)
        optimizer = self.make_optimizer([{"params": [*mentor.parameters(), *hidden_map.parameters()]},
                                         {"params": list(mentee.parameters()), "lr": self.args.kd_mentee_lr}])
        metrics = self.train(ctx, networks, None, self.local_steps(ctx), loss=self.distillation_loss,
                             optimizer=optimizer)
        parameters = dict(mentee.named_parameters())
        upload = compress(parameters, self.energy(ctx.round))
        buffers = {k: v.detach().clone() for k, v in mentee.state_dict().items() if k not in parameters}
        if buffers:
            ctx.state["mentee_buffers"] = buffers
        ctx.state["hidden_map"] = clone_weights(hidden_map.state_dict())
        self.finish_client(ctx, mentor)
        return ClientResult(ctx.client_id, ctx.data.num_samples, upload, ctx.state, metrics, ctx.log_lines)


if __name__ == "__main__":
    sys.exit(main(FedKD))

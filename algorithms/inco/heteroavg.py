"""HeteroAvg (the baseline of Chan et al., "Internal Cross-layer Gradients for Extending
Homogeneity to Heterogeneity in Federated Learning", ICLR 2024) and its combinations with the
suite's FedProx, SCAFFOLD, FedNova and MOON: clients train sub-models of different depths of one
server model (models.py, "InCo's nested depth families"), and the server averages each entry over
the sampled clients that own it. Reference [InCo]: ChanYunHin/InCo-Aggregation @b767140,
fed_experiments/InCo/{main,utils,train}.py (spec/datafree-hetero-privacy.md section 2).

With w the server model, S the sampled clients, S_k those of them whose sub-model has entry k and
w_i client i's trained sub-model (it started from w's entries):

    download   w's entries of client i's sub-model (and of whatever else the base method sends,
               e.g. SCAFFOLD's c: also cut to the sub-model's entries)
    client     the base method's local update (HeteroAvg: CE), from those entries
    upload     w_i, every state-dict entry of the sub-model (weights and BN buffers)
    server     u_k = (1 / |S_k|) sum_{i in S_k} (w_i,k - w_k)      unweighted, over the owners only
               w_k <- w_k + u_k              for every k some sampled client owns (server lr 1);
                                             the other entries keep their value
               BN running_var clamped >= 0; integer entries (num_batches_tracked) add the
               integer part of u_k
    InCo       (inco.py) replaces u by InCo(u) before it is applied

The combinations (the paper's Table 2 rows HeteroProx, HeteroScaffold, HeteroNova, HeteroMOON)
are each the base method's client with the server above; the README of InCo points to NIID-Bench
for the base methods and has no code for them, so each decision below is ours:
    HeteroProx      FedProx's loss CE + mu/2 ||theta - theta_global||^2 over the sub-model's
                    parameters (theta_global = the downloaded entries).
    HeteroScaffold  SCAFFOLD's correction, per entry: c holds every parameter of the server model,
                    client i receives and keeps c and c_i over its sub-model's parameters only
                    (c_i = 0 before its first round), and
                        c_k <- c_k + (1 / N_k) sum_{i in S_k} delta c_i,k
                    with N_k the clients (sampled or not) whose sub-model has parameter k, so c_k
                    stays the mean of the c_i,k of its owners (SCAFFOLD's 1/N, per entry).
    HeteroNova      FedNova's normalised averaging per parameter over its owners, with HeteroAvg's
                    unweighted p_i = 1 / |S_k| (not n_i / n, so equal steps give HeteroAvg exactly):
                        u_k = (sum_{i in S_k} p_i a_i) * sum_{i in S_k} p_i (w_i,k - w_k) / a_i
                    a_i = FedNova's normalising factor of client i's tau_i steps (fednova.py) with
                    momentum rho = --momentum under --optimizer sgd, and rho = 0 (a_i = tau_i)
                    under Adam, whose steps carry no SGD momentum; buffers as HeteroAvg.
    HeteroMOON      MOON's loss with z_global from the downloaded sub-model and z_prev from the
                    client's last trained sub-model; before its first round z_prev comes from the
                    initial server model's entries (MOON's "initial global model"), not from the
                    sub-model's own random initialisation.

Protocol ([InCo] train.py, main.py, README command) and the flags that set it: --model inco-cnn-3-3
--client_models inco5 --client_assignment blocks (client k of N in group floor(5k/N), the
reference's five consecutive groups), --eval groups (the five group models on the global test set,
unweighted mean and a row per group: utils.clients_testing, get_avg_metrics), --optimizer adam
--lr 0.001 --reg 0 (Adam, fresh every round, no weight decay: --wd is parsed but unused),
--epochs 5 --batch_size 64 --drop_last, --no_augment (ToTensor and Resize only); the README's
scale: --n_parties 100 --sample_fraction 0.1 --beta 0.5 --comm_round 500. No flags of their own
besides those of the base method (FedProx/MOON --mu, MOON --temperature, at the suite's defaults:
the paper's values for them were not found).

Reference differences:
- The reference's clients upload deltas; here they upload their weights and the server forms the
  same deltas (the same float32 subtraction w_i - w): same numbers, same bytes.
- The reference scores each group on the test set in batches of 512 with drop_last, so 9,728 of
  the 10,000 Fashion-MNIST test images; --eval groups scores all of them.
- With --partition hetero-fixed the reference loads CIFAR-10's partition indices for Fashion-MNIST
  (its last 10,000 training images never used); here Fashion-MNIST is partitioned itself.
- The reference feeds Fashion-MNIST unnormalised at 32x32; here 28x28, normalised (models.py).
- Every draw is seeded (the reference never seeds).
- FedAvgM's --server_momentum / --server_lr (flags of the FedAvg-based classes) are refused:
  the update is applied with server lr 1, as the reference does.
"""
from collections import Counter

from engine import Algorithm
from fednova import FedNova, normalising_factor
from fedprox import FedProx
from moon import MOON
from scaffold import SCAFFOLD
from utils import UsageError


# ============================================================================ the server's update

def average_update(global_weights, uploads):
    """{k: (1/|S_k|) sum_{i in S_k} (w_i,k - w_k)} over the entries k some upload holds (S_k: the
    uploads holding k), in first-seen order; float32 sums, as the reference; integer entries keep
    the fractional mean (apply_update takes its integer part)."""
    update = {}
    for key in dict.fromkeys(key for weights in uploads for key in weights):
        deltas = [weights[key] - global_weights[key] for weights in uploads if key in weights]
        update[key] = sum(deltas) / len(deltas)
    return update


def apply_update(global_weights, update):
    """w + u for every entry in `update` (a new dict; the others unchanged): running_var clamped
    >= 0, integer entries add the integer part of u (the reference's updated_params)."""
    weights = dict(global_weights)
    for key, step in update.items():
        w = global_weights[key]
        if not w.is_floating_point():
            weights[key] = w + step.to(w.dtype)
        elif key.endswith("running_var"):
            weights[key] = (w + step).clamp(min=0)
        else:
            weights[key] = w + step
    return weights


def check_server_rule(args, name):
    """The update is applied with server lr 1: FedAvgM's flags (on FedAvg-based classes) are refused."""
    if getattr(args, "server_momentum", 0.0) != 0 or getattr(args, "server_lr", 1.0) != 1:
        raise UsageError(f"{name} applies the mean update with server lr 1 (InCo's server); "
                         "drop --server_momentum / --server_lr (FedAvgM's)")


# ============================================================================ HeteroAvg

class HeteroAvg(Algorithm):
    name = "heteroavg"

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        check_server_rule(args, cls.name)

    def owned(self, architecture):
        """The state-dict entries (name -> initial tensor) of a client architecture."""
        return self.setting.initial_weights[architecture]

    def init_server(self, initial_weights):
        """The base method's server state; every client architecture must be a name-prefix subset
        of --model (its entries there, of the same shapes)."""
        server_state = super().init_server(initial_weights)
        for architecture in dict.fromkeys(self.setting.client_models):
            for key, value in self.owned(architecture).items():
                if key not in initial_weights or initial_weights[key].shape != value.shape:
                    raise UsageError(f"{self.name}: client model {architecture} is not part of --model "
                                     f"{self.args.model} ('{key}' {list(value.shape)}); make --model the "
                                     "deepest member of the family (inco-cnn-3-3 for inco5, resnet26-stage "
                                     "for inco-resnets)")
        return server_state

    def download(self, server_state, client_id):
        """The base method's download, every part cut to the entries of the client's sub-model."""
        owned = self.owned(self.architecture(client_id))
        return {kind: {key: value for key, value in part.items() if key in owned}
                for kind, part in super().download(server_state, client_id).items()}

    def server_update(self, server_state, results, server):
        """w <- w + correct_update(averaged_update)."""
        update = self.correct_update(self.averaged_update(server_state, results))
        server_state["weights"] = apply_update(server_state["weights"], update)
        return server_state

    def averaged_update(self, server_state, results):
        """u: the unweighted mean over owners of the clients' deltas."""
        return average_update(server_state["weights"], [r.upload["weights"] for r in results])

    def correct_update(self, update):
        """InCo's hook (inco.py); HeteroAvg applies the mean as it is."""
        return update


# ============================================================================ with the base methods

class HeteroProx(HeteroAvg, FedProx):
    """FedProx's local loss (fedprox.py) over the sub-model, HeteroAvg's server."""
    name = "heteroprox"


class HeteroMOON(HeteroAvg, MOON):
    """MOON's local loss (moon.py) over the sub-model, HeteroAvg's server."""
    name = "heteromoon"

    def prepare_client(self, ctx, model):
        """Before a client's first round its previous model is the initial server model's entries."""
        if "local_model" not in ctx.state:
            initial_server = self.setting.initial_weights[self.args.model]
            ctx.previous_weights = {key: initial_server[key] for key in self.owned(ctx.architecture)}
        super().prepare_client(ctx, model)


class HeteroScaffold(HeteroAvg, SCAFFOLD):
    """SCAFFOLD's client (scaffold.py) over the sub-model's parameters; c_k averaged over owners."""
    name = "heteroscaffold"

    def owners(self):
        """N_k: how many clients (sampled or not) have parameter k."""
        return Counter(key for architecture in self.setting.client_models for key in self.owned(architecture))

    def server_update(self, server_state, results, server):
        """c_k <- c_k + (1 / N_k) sum over the sampled owners of delta c_i,k; then HeteroAvg's update."""
        owners = self.owners()
        control = dict(server_state["control"])
        for name, c in control.items():
            deltas = [r.upload["control_delta"][name] for r in results if name in r.upload["control_delta"]]
            if deltas:
                control[name] = c + sum(deltas) / owners[name]
        server_state["control"] = control
        return super().server_update(server_state, results, server)


class HeteroNova(HeteroAvg, FedNova):
    """FedNova's normalised averaging (fednova.py) per parameter over its owners, p_i = 1/|S_k|."""
    name = "heteronova"

    @classmethod
    def check_args(cls, args):
        """FedNova's checks, with Adam allowed (a_i = tau_i: no SGD momentum to correct for)."""
        if args.optimizer == "sgd" and not 0 <= args.momentum < 1:
            raise UsageError(f"{cls.name} needs 0 <= --momentum < 1 under SGD (got {args.momentum})")
        check_server_rule(args, cls.name)

    def averaged_update(self, server_state, results):
        """u_k = (sum p_i a_i) * sum p_i (w_i,k - w_k) / a_i over the owners of parameter k;
        buffers: HeteroAvg's mean."""
        update = super().averaged_update(server_state, results)
        rho = self.args.momentum if self.args.optimizer == "sgd" else 0.0
        factors = [normalising_factor(r.metrics["steps"], rho) for r in results]
        global_weights = server_state["weights"]
        for name, _ in self.model("local", self.args.model).named_parameters():
            owners = [(r.upload["weights"][name], a) for r, a in zip(results, factors) if name in r.upload["weights"]]
            if not owners:
                continue
            w, p = global_weights[name].double(), 1.0 / len(owners)
            effective_steps = sum(p * a for _, a in owners)
            direction = sum(p * (local.double() - w) / a for local, a in owners)
            update[name] = (effective_steps * direction).to(global_weights[name].dtype)
        return update

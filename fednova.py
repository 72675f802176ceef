"""FedNova (Wang et al. 2020): FedAvg with each client's update normalised by its local steps,
as NIID-Bench implements it (github.com/Xtra-Computing/NIID-Bench, experiments.py:
train_net_fednova and the `fednova` branch of the main loop).

A client running tau SGD steps with momentum rho has the normalising factor

    a_i = (tau - rho * (1 - rho^tau) / (1 - rho)) / (1 - rho)        (a_i = tau when rho = 0)

and the normalised update d_i = (w_global - w_i) / a_i. With p_i = n_i / sum_sampled n_j:

    w_global <- w_global - (sum_i p_i a_i) * sum_i p_i d_i

over the trainable parameters; other state-dict entries (buffers) are averaged as in FedAvg
(NIID-Bench applies the update to every entry). tau is the steps the client took
(r.metrics["steps"]: --num_local_iterations, or E * ceil(n_i / batch_size) with --epochs E).
With equal tau for every client (any rho) all a_i are equal and this is exactly FedAvg.

    python -u fednova.py --dataset fashionmnist --partition noniid --beta 0.1 --comm_round 70
"""
import sys

from engine import main, weighted_average
from fedavg import FedAvg
from utils import UsageError


def normalising_factor(tau, rho):
    """a = (tau - rho (1 - rho^tau) / (1 - rho)) / (1 - rho); tau for plain SGD (rho = 0)."""
    if rho == 0:
        return float(tau)
    return (tau - rho * (1 - rho ** tau) / (1 - rho)) / (1 - rho)


class FedNova(FedAvg):
    name = "fednova"

    @classmethod
    def check_args(cls, args):
        if args.optimizer != "sgd":
            raise UsageError(f"FedNova normalises SGD updates; use --optimizer sgd (got {args.optimizer})")
        if not 0 <= args.momentum < 1:
            raise UsageError(f"FedNova needs 0 <= --momentum < 1 (got {args.momentum})")
        if args.server_momentum != 0:
            raise UsageError("FedNova has no server momentum; drop --server_momentum")

    def server_update(self, server_state, results, server):
        """w_global - (sum_i p_i a_i) * sum_i p_i (w_global - w_i) / a_i."""
        global_weights = server_state["weights"]
        total = sum(r.num_samples for r in results)
        shares = [r.num_samples / total for r in results]
        factors = [normalising_factor(r.metrics["steps"], self.args.momentum) for r in results]
        effective_steps = sum(p * a for p, a in zip(shares, factors))
        uploaded = [r.upload["weights"] for r in results]
        new_weights = weighted_average(uploaded, [r.num_samples for r in results])
        for name, _ in self.model("local").named_parameters():
            w = global_weights[name].double()
            direction = sum(p * (w - weights[name].double()) / a for p, a, weights in zip(shares, factors, uploaded))
            new_weights[name] = (w - effective_steps * direction).to(global_weights[name].dtype)
        server_state["weights"] = new_weights
        return server_state


if __name__ == "__main__":
    sys.exit(main(FedNova))

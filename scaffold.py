"""SCAFFOLD (Karimireddy et al. 2020, option II) as NIID-Bench implements it (Li et al. 2022,
github.com/Xtra-Computing/NIID-Bench, experiments.py: train_net_scaffold,
local_train_net_scaffold and the `scaffold` branch of the main loop).

The server keeps a control variate c, each client its own c_i (zeros before its first round),
both over the trainable parameters. With the client's optimiser (--optimizer, --momentum, --reg
as for every algorithm) and learning rate lr:

    after every local optimiser step:  w <- w - lr * (c - c_i)      (the weights, not the gradient)
    after training:    c_i+ = c_i - c + (w_global - w_local) / (K * lr),  K = the steps taken
    upload:            w_local and delta_c_i = c_i+ - c_i
    server:            w_global = sum_i (n_i / n) w_i    (as FedAvg)
                       c <- c + sum over sampled of delta_c_i / n_parties

The correction is added to the weights outside the optimiser, so momentum never amplifies it,
and (w_global - w_local) / (K lr) is the mean displacement per step that c_i stands for: the
option II estimate stays consistent with any momentum, without a momentum factor.

    python -u scaffold.py --dataset fashionmnist --partition noniid --beta 0.1 --comm_round 70
"""
import sys

import torch

from engine import main
from fedavg import FedAvg


class SCAFFOLD(FedAvg):
    name = "scaffold"

    def init_server(self, initial_weights):
        """The global model and the server's control variate c = 0 over the trainable parameters."""
        server_state = super().init_server(initial_weights)
        names = [name for name, _ in self.model("local").named_parameters()]
        server_state["control"] = {name: torch.zeros_like(initial_weights[name]) for name in names}
        return server_state

    def download(self, server_state, client_id):
        return {"weights": server_state["weights"], "control": server_state["control"]}

    # ------------------------------------------------------------------ client side
    def client_control(self, ctx):
        """c_i, zeros before the client's first round."""
        if "control" in ctx.state:
            return ctx.state["control"]
        return {name: torch.zeros_like(c) for name, c in ctx.download["control"].items()}

    def prepare_client(self, ctx, model):
        """The weight correction lr * (c - c_i) of every step, and the step count K = 0."""
        server_control, client_control = ctx.download["control"], self.client_control(ctx)
        self.weight_correction = {name: self.args.lr * (server_control[name] - client_control[name])
                                  for name in server_control}
        self.steps_taken = 0

    def after_optimizer_step(self, model, ctx):
        """w <- w - lr * (c - c_i); counts the step."""
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in self.weight_correction:
                    p.sub_(self.weight_correction[name])
        self.steps_taken += 1

    def upload(self, ctx, model):
        """The weights and delta_c_i; the client keeps c_i+ = c_i - c + (w_global - w_local) / (K lr)."""
        server_control, client_control = ctx.download["control"], self.client_control(ctx)
        distance_per_gradient = self.steps_taken * self.args.lr
        local = dict(model.named_parameters())
        new_control = {name: client_control[name] - server_control[name]
                       + (ctx.download["weights"][name] - local[name].detach()) / distance_per_gradient
                       for name in server_control}
        ctx.state["control"] = new_control
        upload = super().upload(ctx, model)
        upload["control_delta"] = {name: new_control[name] - client_control[name] for name in new_control}
        return upload

    # ------------------------------------------------------------------ server side
    def server_update(self, server_state, results, server):
        """FedAvg's average of the models; c <- c + sum over sampled of delta_c_i / n_parties."""
        server_state["control"] = {
            name: c + sum(r.upload["control_delta"][name] for r in results) / self.args.n_parties
            for name, c in server_state["control"].items()}
        return super().server_update(server_state, results, server)


if __name__ == "__main__":
    sys.exit(main(SCAFFOLD))

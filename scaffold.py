"""SCAFFOLD (Karimireddy et al. 2020, option II): control variates correct the client drift.

The server keeps a control variate c, each client its own c_i (zeros before its first round),
both over the trainable parameters only. With K local steps of learning rate lr, momentum rho:

    every local step:  g <- g + (c - c_i)
    after training:    c_i+ = c_i - c + (w_global - w_local) / (a * lr)
                       a = K for plain SGD (the paper's option II), and with momentum
                       a = (K - rho (1 - rho^K) / (1 - rho)) / (1 - rho)  (FedNova's factor)
    upload:            w_local and delta_c_i = c_i+ - c_i
    server:            w_global = sum_i (n_i / n) w_i    (as FedAvg)
                       c <- c + (|sampled| / n_parties) * mean over sampled of delta_c_i

Why a rather than K: K momentum steps move the weights by about lr * a * (mean gradient), so
dividing by K * lr overestimates c_i by up to 1 / (1 - rho), 10x at this suite's default
momentum 0.9, and training then diverges within three rounds.

    python -u scaffold.py --dataset fashionmnist --partition noniid --beta 0.1 --comm_round 70
"""
import sys

import torch

from engine import main
from fedavg import FedAvg
from fednova import normalising_factor


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
        server_control, client_control = ctx.download["control"], self.client_control(ctx)
        self.gradient_correction = {name: server_control[name] - client_control[name]
                                    for name in server_control}

    def before_optimizer_step(self, model, ctx):
        """g <- g + (c - c_i)."""
        for name, p in model.named_parameters():
            if name in self.gradient_correction:
                p.grad.add_(self.gradient_correction[name])

    def upload(self, ctx, model):
        """The weights and delta_c_i; the client keeps c_i+ = c_i - c + (w_global - w_local) / (a lr)."""
        server_control, client_control = ctx.download["control"], self.client_control(ctx)
        momentum = self.args.momentum if self.args.optimizer == "sgd" else 0.0
        distance_per_gradient = normalising_factor(self.args.num_local_iterations, momentum) * self.args.lr
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
        """FedAvg's average of the models; c <- c + (1 / n_parties) * sum over sampled of delta_c_i."""
        server_state["control"] = {
            name: c + sum(r.upload["control_delta"][name] for r in results) / self.args.n_parties
            for name, c in server_state["control"].items()}
        return super().server_update(server_state, results, server)


if __name__ == "__main__":
    sys.exit(main(SCAFFOLD))

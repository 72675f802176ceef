"""FedProx (Li et al. 2020): FedAvg with a proximal term in every client's local loss.

    loss = CE(model(x), y) + (mu / 2) * sum over all parameters of ||theta - theta_global||^2

    python -u fedprox.py --mu 0.01 --dataset fashionmnist --partition noniid --beta 0.1 --comm_round 70
"""
import sys

import torch.nn.functional as F

from engine import Flag, main
from fedavg import FedAvg
from utils import UsageError


class FedProx(FedAvg):
    name = "fedprox"
    flags = (Flag("mu", float, 0.01, "proximal weight mu", "the published code's default and the seed's command line"),)

    @classmethod
    def check_args(cls, args):
        if args.mu < 0:
            raise UsageError(f"--mu must be >= 0 for FedProx (got {args.mu})")

    def local_loss(self, model, x, y, ctx):
        """CE + (mu / 2) * ||theta - theta_global||^2 over all parameters."""
        proximal = sum((theta - theta_global).pow(2).sum()
                       for theta, theta_global in zip(model.parameters(), ctx.global_model.parameters()))
        return F.cross_entropy(model(x), y) + self.args.mu / 2 * proximal


if __name__ == "__main__":
    sys.exit(main(FedProx))

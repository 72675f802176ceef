"""MOON (Li, He and Song 2021): FedAvg with a model-contrastive term in the local loss.

With z = model.features(x) (the 84-d output of `base`, no projection head), z_global from the
current global model and z_prev from the client's previous local model (both frozen, eval mode):

    loss = CE(model(x), y) + mu * CE([cos(z, z_global), cos(z, z_prev)] / temperature, target 0)

A client's previous model is its trained model from the last round it took part in; before
its first round it is the run's initial global model (the engine's ctx.previous_weights, kept
because MOON declares keeps_local_model).

    python -u moon.py --mu 0.1 --dataset fashionmnist --partition noniid --beta 0.1 --comm_round 70
"""
import sys

import torch
import torch.nn.functional as F

from engine import Flag, main
from fedavg import FedAvg
from utils import UsageError

SEED_COMMAND_LINE = "the seed's command line `moon.py --mu 0.1` (seeds/fedhug-readme.md)"


class MOON(FedAvg):
    name = "moon"
    keeps_local_model = True
    flags = (
        Flag("mu", float, 0.1, "weight mu of the model-contrastive term", SEED_COMMAND_LINE),
        Flag("temperature", float, 0.5, "contrastive temperature", "Li, He and Song 2021 (SPEC section 5)"),
    )

    @classmethod
    def check_args(cls, args):
        if args.mu < 0:
            raise UsageError(f"--mu must be >= 0 for MOON (got {args.mu})")
        if not args.temperature > 0:
            raise UsageError(f"--temperature must be > 0 (got {args.temperature})")

    def prepare_client(self, ctx, model):
        """Load the client's previous local model (the initial global model if it never trained)."""
        self.previous_model = self.frozen_model("previous", ctx.architecture, ctx.previous_weights)

    def local_loss(self, model, x, y, ctx):
        """CE + mu * CE([cos(z, z_global), cos(z, z_prev)] / temperature, target 0)."""
        z = model.features(x)
        logits = model.classifier(z)
        with torch.no_grad():
            z_global = ctx.global_model.features(x)
            z_previous = self.previous_model.features(x)
        similarities = torch.stack([F.cosine_similarity(z, z_global, dim=1),
                                    F.cosine_similarity(z, z_previous, dim=1)], dim=1)
        positive_first = torch.zeros(len(y), dtype=torch.long, device=y.device)
        contrastive = F.cross_entropy(similarities / self.args.temperature, positive_first)
        return F.cross_entropy(logits, y) + self.args.mu * contrastive


if __name__ == "__main__":
    sys.exit(main(MOON))

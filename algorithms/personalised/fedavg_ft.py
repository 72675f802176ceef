"""FedAvg+FT: FedAvg whose clients each report the global model fine-tuned on their own data.

The federation is FedAvg's (clients train from the global model, the server averages them
weighted by sample counts). Only what a client reports changes: at evaluation (--eval local:
after download, before training) it copies the downloaded global model, runs --ft_epochs
passes of local SGD (the run's optimiser, learning rate and batch size) over its training
split, and scores that copy on its test split; the copy is then discarded, so the federation
itself is FedAvg, round for round. Both series are recorded: "finetuned" (the headline) and
"global" (FedAvg's own number), so one run gives both rows of the personalised comparison.

This is the usual "FedAvg + local fine-tuning" baseline of personalised FL (e.g. Wang et al.
2019, "Federated Evaluation of On-device Personalization", arXiv:1910.10252); the fine-tuning
draws from an evaluation generator of its own, so it changes no training draw.
"""
import sys

from engine import Flag, main
from fedavg import FedAvg
from utils import UsageError


class FedAvgFT(FedAvg):
    name = "fedavg-ft"
    flags = (Flag("ft_epochs", int, 1, "local fine-tuning epochs before each client's evaluation", "this suite"),)
    evaluations = ("local",)

    @classmethod
    def check_args(cls, args):
        if args.ft_epochs < 1:
            raise UsageError(f"--ft_epochs must be at least 1 (got {args.ft_epochs})")

    def evaluation_model(self, ctx):
        """{"finetuned": the global model after ft_epochs local passes, "global": the global model}."""
        finetuned = self.model("finetuned", ctx.architecture)
        finetuned.requires_grad_(True)
        finetuned.load_state_dict(self.compose_weights(ctx.architecture, ctx.download, ctx.state))
        steps = self.args.ft_epochs * self.batches_per_epoch(ctx.data.num_samples)
        self.train(ctx, finetuned, finetuned.parameters(), steps)
        finetuned.eval()
        return {"finetuned": finetuned, "global": super().evaluation_model(ctx)}


if __name__ == "__main__":
    sys.exit(main(FedAvgFT))

"""<Name> (<authors> <year>): <one line on what differs from FedAvg>.

Copy this file to algorithms/<family>/<name>.py, keep the methods that differ, delete the
rest, state the formulas in the docstrings, then add one line to engine/registry.py:

    Entry("<name>", "<Display>", "algorithms.<family>.<name>", "<Class>", "main.py", "<family>"),

and run it: python main.py --algorithm <name> [flags]. Every method below shows the engine's
default (FedAvg's); a subclass overrides only what differs.
"""
import sys

import torch.nn.functional as F

from engine import Algorithm, Flag, clone_weights, main, weighted_average


class Template(Algorithm):
    name = "template"
    flags = (Flag("mu", float, 0.01, "what mu weighs", "the paper's Table 3 / the reference code's main.py"),)
    keeps_local_model = False     # True: ctx.previous_weights = the client's last trained model
    broadcast_to_all = False      # True: every client gets the download each round (so does --eval local)

    @classmethod
    def check_args(cls, args):
        """Refuse bad values of this algorithm's flags with utils.UsageError (one clear line)."""

    # ------------------------------------------------------------------ server
    def initialise_server(self, server_state, contexts, server):
        """Once before round 0 with every client's context (e.g. FedDBE's initialisation epoch)."""
        return server_state

    def init_server(self, initial_weights):
        """The server's state before round 0: anything checkpointable (tensors, numbers, dicts,
        module and optimiser state dicts). "weights" is the global model; partial or absent is fine."""
        return {"weights": clone_weights(initial_weights)}

    def download(self, server_state, client_id):
        """What the server sends client `client_id` (counted in bytes_downloaded)."""
        return {"weights": server_state["weights"]}

    def server_update(self, server_state, results, server):
        """The new server state from the round's ClientResults (r.upload, r.num_samples,
        r.metrics). Random draws: server.generator; log lines: server.log(...)."""
        server_state["weights"] = weighted_average([r.upload["weights"] for r in results],
                                                   [r.num_samples for r in results])
        return server_state

    # ------------------------------------------------------------------ client
    # client_update(ctx) = client_model -> prepare_client -> train -> upload -> finish_client.
    # ctx.download, ctx.state (persistent, yours), ctx.data (its data: .stream(generator),
    # .class_counts, .num_samples), ctx.generator (all randomness), ctx.global_model.

    def receive(self, ctx):
        """Every client that got ctx.download, sampled or not, first: update ctx.state (e.g. adapt
        the download into its personal model). Runs before evaluation and client_update."""

    def prepare_client(self, ctx, model):
        """Before local training (e.g. load a previous model, synthesise data)."""

    def local_loss(self, model, x, y, ctx):
        """The loss of one local step."""
        return F.cross_entropy(model(x), y)

    def before_optimizer_step(self, model, ctx):
        """Between backward and each optimiser step (e.g. correct or clip the gradients)."""

    def after_optimizer_step(self, model, ctx):
        """Right after each optimiser step (e.g. correct the weights, as SCAFFOLD does)."""

    def upload(self, ctx, model):
        """What the client sends (counted in bytes_uploaded): any named tensors."""
        return {"weights": clone_weights(model.state_dict())}

    def finish_client(self, ctx, model):
        """After training: store what the client keeps in ctx.state (checkpointed)."""
        super().finish_client(ctx, model)

    # ------------------------------------------------------------------ evaluation
    def evaluation_model(self, ctx):
        """--eval local: the model this client reports on its own test split after `receive`,
        before training, or {series: model} for several series (the first is the headline; e.g.
        Ditto's personal and global). ctx.generator is its own; leave ctx.state unchanged."""
        return super().evaluation_model(ctx)


if __name__ == "__main__":
    sys.exit(main(Template))

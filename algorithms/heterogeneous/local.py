"""Local (local-only training, no federation): every client trains its own model on its own data
and never communicates. The baseline every model-heterogeneous table needs: a method that
shares something should beat it (HtFLlib's `-algo Local`).

    download  nothing            upload  nothing            server  nothing
    client    local_steps(ctx) SGD steps on CE(model_k(x), y) from its own last model
              (the run's initial model of its architecture before its first round)
    reported  --eval local: the client's own model on its own test split, before its round's
              training (as every method here: round 0 is the initial model)

Any architectures (--client_models A,B,... or a group; the feature sizes may differ). No flags of
its own. HtFLlib's protocol: --eval local --lr 0.01 --batch_size 10 --epochs 1 --drop_last
--momentum 0 --reg 0 --no_augment (or --scenario pfllib --lr 0.01).

Source: HtFLlib clients/clientlocal.py, servers/serverlocal.py.

Reference differences:
- serverlocal.py draws the clients to train a second time after evaluating (select_clients
  twice); with every client taking part (HtFLlib's -jr 1) that changes nothing. Here the round's
  sampled clients train (--sample_fraction).
- The engine adds each sampled client's sample count (8 bytes) to bytes_uploaded_by_kind
  ("num_samples") even though nothing is sent; the payload itself is empty (0 bytes down, 0 up).
"""
import sys

from engine import Algorithm, main


class Local(Algorithm):
    name = "local"
    evaluations = ("local",)
    keeps_local_model = True      # ctx.state["local_model"]: the client's model, kept across rounds

    def init_server(self, initial_weights):
        return {"weights": {}}

    def initialise_server(self, server_state, contexts, server):
        server.log("Local reports each client's own model, trained on its own data alone, on its own test split")
        return server_state

    def download(self, server_state, client_id):
        return {}

    def upload(self, ctx, model):
        return {}

    def server_update(self, server_state, results, server):
        return server_state


if __name__ == "__main__":
    sys.exit(main(Local))

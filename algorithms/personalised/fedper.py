"""FedPer (Arivazhagan, Aggarwal, Singh and Choudhary 2019, "Federated Learning with Personalization
Layers", arXiv:1912.00818): FedAvg over the base (the feature extractor) only; every client keeps
its own head, which never leaves it.

With theta the base (every tensor outside the model's head module) and phi_k client k's head:

    download  theta, the global base; the client's model is (theta, phi_k)
    client    local_steps(ctx) SGD steps on CE(h_phi_k(f_theta(x)), y) over all its parameters
              jointly (PFLlib issue #45: base and head are trained together)
    upload    theta_k only: the head is neither uploaded nor counted
    server    theta <- sum_k (n_k / sum_j n_j) theta_k over the clients that uploaded
    reported  the global base with the client's own head (--eval local: every client, after the
              download and before training)

No flags of its own. PFLlib's protocol and defaults (batch 10, lr 0.005, plain SGD, 1 epoch,
drop_last, FedAvgCNN) come with --scenario pfllib.

Source: PFLlib clients/clientper.py, servers/serverper.py (spec/pfl-htfl.md section 2).

Reference differences:
- PFLlib writes the global base into every client's model at every download, sampled or not. Here
  a client's state holds only its personal part (state["head"]) and its model is composed from the
  latest download every time it is used, so every client that receives a round's download, sampled
  or not, holds the current global base, as in PFLlib, without K stored copies of the base;
  `receive` has nothing to do.
- Every client's head starts as the run's initial head (PFLlib seeds torch with 0 before every
  client's model, so its heads also start equal).
- Only the personal part is kept per client (the checkpoint holds K heads, not K models).
- `--eval global` would have no personal head to use, so it is refused (`evaluations`): these
  methods report under `--eval local`.

The class is written for a split into a shared and a personal part named by `shared_part` and
`personal_part`; LG-FedAvg (lgfedavg.py) is the same class with the two swapped.
"""
import sys

from engine import Algorithm, clone_weights, main, split_head
from utils import UsageError


class FedPer(Algorithm):
    name = "fedper"
    evaluations = ("local",)      # the engine refuses --eval global: there is no personal head there
    shared_part, personal_part = "base", "head"

    def parts(self, weights, architecture):
        """{"base": ..., "head": ...}: the weights split at the architecture's head module."""
        base, head = split_head(weights, self.head_prefix(architecture))
        return {"base": base, "head": head}

    def download(self, server_state, client_id):
        """The shared part of the global model."""
        return {"weights": self.parts(server_state["weights"], self.args.model)[self.shared_part]}

    def compose_weights(self, architecture, download, state):
        """The initial weights, overwritten by the downloaded shared part and the kept personal part."""
        received = download.get("weights", {})
        own = self.parts(self.setting.initial_weights[architecture], architecture)[self.shared_part]
        if received and own and not set(own) & set(received):
            raise UsageError(f"a {architecture} client's {self.shared_part} has no entry in common with that of "
                             f"--model {self.args.model}: nothing would be shared; give --model a member of "
                             "--client_models whose " f"{self.shared_part} fits the others'")
        weights = super().compose_weights(architecture, download, state)
        weights.update(state.get(self.personal_part, {}))
        return weights

    def upload(self, ctx, model):
        """The shared part only."""
        return {"weights": self.parts(clone_weights(model.state_dict()), ctx.architecture)[self.shared_part]}

    def finish_client(self, ctx, model):
        """Keep the personal part."""
        ctx.state[self.personal_part] = self.parts(clone_weights(model.state_dict()), ctx.architecture)[
            self.personal_part]


if __name__ == "__main__":
    sys.exit(main(FedPer))

"""FedProto (Tan, Long, Liu, Zhou, Lu, Jiang and Zhang, "FedProto: Federated Prototype Learning
across Heterogeneous Clients", AAAI 2022): clients of any architectures (one feature size D)
share class prototypes, the mean representation of each class, instead of weights.

With f_k, h_k client k's feature extractor and head (both personal, never sent) and z = f_k(x):

    download  {c: P_c}: the global prototypes of the classes any uploader had last round (none
              before the first aggregation)
    client    local_steps(ctx) SGD steps on CE(h_k(z), y) + lambda * MSE(z, T),
              T_i = P_{y_i} if class y_i has a global prototype, else z_i.detach() (no pull,
              still counted in the mean over B*D elements); no regulariser before round 1
    upload    {c: P_k,c}, P_k,c = mean of z.detach() over the training samples of class c seen
              during this round's steps (the model moves during the round); D floats a class
    server    P_c = (1/|K_c|) sum_{k in K_c} P_k,c over the uploaders K_c holding c (unweighted,
              HtFLlib's proto_aggregation); --proto_weighting class_counts: weights |D_k,c|
    reported  --eval local: the client's own f_k with the nearest global prototype,
              y_hat = argmin_c MSE(f_k(x), P_c); 0 before any prototype exists (the reference's
              0 correct); series accuracy_own_head: h_k(f_k(x))

Flags:
  --proto_lambda 10     lambda. HtFLlib system/total.sh runs FedProto with -lam 10; main.py's
                        default (and PFLlib's) is 1.0. FedTGP's paper quotes lambda 0.1 "the same as
                        FedProto" with a Euclidean distance; the code's MSE with 10 is the maintainer's
                        matching value (FedTGP issue #3, HtFLlib issues #2, #12).
  --proto_weighting uniform   uniform: the reference's unweighted mean across clients;
                        class_counts: the paper's weights |D_k,c| (every client's label counts
                        are setup-time metadata here, so nothing more is uploaded).
HtFLlib's protocol: --eval local, lr 0.01 (pass --lr 0.01), batch 10, one epoch (--epochs 1
--drop_last), plain SGD (--momentum 0 --reg 0), no augmentation (--no_augment);
--scenario pfllib sets all of these but the lr (PFLlib: 0.005).

Source: HtFLlib clients/clientproto.py, servers/serverproto.py (spec/pfl-htfl.md section 3; PFLlib
has the same maths).

Reference differences:
- The server's mean is unweighted across clients (HtFLlib, PFLlib and the official code's
  proto_aggregation), while the paper weights each client's prototype by its class count; the
  maintainer calls them equivalent (HtFLlib issue #10), which holds within a client, not across
  clients. Default: the reference; --proto_weighting class_counts gives the paper's.
- Prototypes are summed in float64 (the reference sums float32 one sample at a time).
- Evaluation before the first prototypes: the reference returns 0 correct out of 1e-5 samples;
  here the client's samples are counted and none is correct (accuracy 0 either way).
- The client's batches follow the engine's stream (shuffled each pass from ctx.generator;
  HtFLlib's train loader does not shuffle).
"""
import sys

from algorithms.heterogeneous.common import ClassMeans, PrototypeMethod, aggregate_prototypes
from engine import Flag, main
from utils import UsageError

WEIGHTINGS = ("uniform", "class_counts")


class FedProto(PrototypeMethod):
    name = "fedproto"
    display = "FedProto"
    flags = (Flag("proto_weighting", str, "uniform",
                  "FedProto: server mean of the client prototypes, uniform (reference) or class_counts (paper)",
                  "HtFLlib servers/serverproto.py proto_aggregation (unweighted); the paper weights by |D_k,c|"),)

    @classmethod
    def check_args(cls, args):
        super().check_args(args)
        if args.proto_weighting not in WEIGHTINGS:
            raise UsageError(f"--proto_weighting must be one of {', '.join(WEIGHTINGS)} (got {args.proto_weighting})")

    def prepare_client(self, ctx, model):
        super().prepare_client(ctx, model)
        ctx.seen_features = ClassMeans(self.num_classes)

    def observe_features(self, features, labels, ctx):
        ctx.seen_features.add(features, labels)

    def upload(self, ctx, model):
        """The class means of the features seen while training, and nothing else."""
        return {"prototypes": ctx.seen_features.means()}

    def server_update(self, server_state, results, server):
        """The new global prototypes replace the old ones (classes nobody uploaded this round drop out)."""
        if not results:
            return server_state
        weights = None
        if self.args.proto_weighting == "class_counts":
            weights = [self.setting.class_counts[r.client_id] for r in results]
        server_state["prototypes"] = aggregate_prototypes([r.upload["prototypes"] for r in results], weights)
        return server_state


if __name__ == "__main__":
    sys.exit(main(FedProto))

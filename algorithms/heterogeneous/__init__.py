"""Model-heterogeneous federated learning, the way HtFLlib (TsingZ0/HtFLlib) runs it: every client
keeps a model of its own architecture (--client_models hcnns8, light4 or A,B,...: client k gets
member k mod M; models.py), and clients share class prototypes, logits, heads or factors instead
of weights. Reported under --eval local (each client's own model, or its nearest-prototype
predictor, on its own test split; spec/pfl-htfl.md sections 1.3, 3, 4).

The family: Local (local.py: each client alone, no communication: the baseline), FedProto
(fedproto.py: class prototypes averaged by the server, a prototype-distance regulariser),
FedTGP (fedtgp.py: a trainable global prototype generator trained by the server with an
adaptive margin), FedGH (fedgh.py: a global head trained by the server on the clients'
prototypes), FedDistill (feddistill.py: per-class mean logits), FML (fml.py) and FedKD
(fedkd.py): mutual distillation with a shared meme/mentee, FedGen (fedgen.py: a server-trained
feature generator) and FedKTL (fedktl.py, generator.py). Shared pieces (class-prototype means,
prototype aggregation, the nearest-prototype predictor) are in common.py. Each module states its
paper, formulas, flags with the sources of their defaults and its reference differences.
"""

"""Personalised federated learning, the way PFLlib (TsingZ0/PFLlib) runs it: every client ends a
round with a model of its own, reported on its own test split (--eval local; --scenario pfllib for
the reference protocol). The family: FedPer (fedper.py: shared base, personal head), FedRep
(fedrep.py: FedPer with the head trained first, then the base), LG-FedAvg (lgfedavg.py: shared
head, personal base), Ditto (ditto.py: a personal model pulled towards the global one by a proximal
term), FedALA (adaptive element-wise aggregation of the global model into the local one), Per-FedAvg
(first-order MAML, reported after one local step), FedCP (a conditional policy splitting each
feature between a global and a personal head), GPFL (global and personalised conditional inputs),
FedDBE (a personal bias on the representation and a global mean regulariser) and FedAvg+FT (the
global FedAvg model, fine-tuned on each client's own data before it is evaluated). Each module
states its paper, its formulas, its flags with the sources of their defaults, and where it differs
from the reference code (spec/pfl-htfl.md, spec/pfl-advanced.md).
"""

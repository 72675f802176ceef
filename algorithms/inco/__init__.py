"""Model-heterogeneous federated learning by nested depths, InCo's way (ChanYunHin/InCo-Aggregation;
spec/datafree-hetero-privacy.md section 2): every client trains a sub-model of one server model (the
first blocks of each stage: models.py, "InCo's nested depth families", groups inco5 and
inco-resnets), the server averages each entry over the sampled clients that own it, and every group
model is scored on the global test set (--eval groups).

    heteroavg.py  HeteroAvg (per-entry unweighted mean of the deltas over owners, w <- w + mean) and
                  HeteroProx, HeteroScaffold, HeteroNova, HeteroMOON: the suite's FedProx, SCAFFOLD,
                  FedNova and MOON clients with that server
    inco.py       the InCo step (each deep conv's averaged update corrected by its stage's first
                  same-shaped conv's) and InCoAvg, InCoProx, InCoScaffold, InCoNova, InCoMOON

    python main.py --algorithm incoavg      # --model inco-cnn-3-3 --client_models inco5 --client_assignment
                                            # blocks --eval groups, Adam lr 0.001, 5 epochs of batch 64
"""

"""LG-FedAvg (Liang, Liu, Ziyin, Allen, Auerbach, Brent, Salakhutdinov and Morency 2020, "Think
Locally, Act Globally: Federated Learning with Local and Global Representations", arXiv:2001.01523,
NeurIPS 2019 workshop): FedPer mirrored. The head is shared and averaged; every client keeps its
own base (its local representation), which never leaves it.

With phi the global head and theta_k client k's base:

    download  phi, the global head; the client's model is (theta_k, phi)
    client    local_steps(ctx) SGD steps on CE(h_phi(f_theta_k(x)), y) over all its parameters jointly
    upload    phi_k only (the head: 850 floats for simplecnn-mnist, 5,130 for fedavgcnn)
    server    phi <- sum_k (n_k / sum_j n_j) phi_k over the clients that uploaded
    reported  the client's own base with the global head (--eval local)

No flags of its own (--scenario pfllib gives PFLlib's protocol and defaults).

Source: PFLlib clients/clientlg.py, servers/serverlg.py, the same in HtFLlib (spec/pfl-htfl.md
section 2); the original code is pliang279/LG-FedAvg main_lg.py.

Reference differences:
- As PFLlib: no FedAvg pre-training, the head alone is shared, the average is sample-weighted.
  The original code differs on all three: it requires a FedAvg-pretrained start (--load_fed), shares
  the top `num_layers_keep` layers and averages them unweighted (divided by the number of clients);
  it also tracks a best model per user. A FedAvg start is available here with --load_path.
- PFLlib writes the global head into every client at every download; here the head always comes from
  the latest download and the state holds only the base (state["base"]): the same models, see
  fedper.py. Every client's base starts as the run's initial base (PFLlib: equal initial models).
- `--eval global` is refused (as FedPer's): use `--eval local`.
"""
import sys

from algorithms.personalised.fedper import FedPer
from engine import main


class LGFedAvg(FedPer):
    name = "lgfedavg"
    shared_part, personal_part = "head", "base"


if __name__ == "__main__":
    sys.exit(main(LGFedAvg))

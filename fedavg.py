"""FedAvg, and FedAvgM with --server_momentum b > 0 (the shared engine is federation.py).

    python -u fedavg.py --dataset fashionmnist --partition noniid --beta 0.1 --comm_round 70
    python -u fedavg.py --server_momentum 0.9 ...        # FedAvgM
"""
import sys

from federation import FedAvg, main

if __name__ == "__main__":
    sys.exit(main(FedAvg))

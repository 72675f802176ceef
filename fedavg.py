"""FedAvg (McMahan et al. 2017), and FedAvgM (Hsu et al. 2019) with --server_momentum b > 0.

Client: SGD on CE from the global weights for --num_local_iterations steps (the engine's default).
Server: w_avg = sum_k (n_k / n) w_k; with momentum b > 0:
    delta = w_global - w_avg;  v = b v + delta;  w_global = w_global - server_lr * v

    python -u fedavg.py --dataset fashionmnist --partition noniid --beta 0.1 --comm_round 70
    python -u fedavg.py --server_momentum 0.9 ...        # FedAvgM (python main.py --algorithm fedavgm)
"""
import sys

from engine import Algorithm, Flag, main


class FedAvg(Algorithm):
    name = "fedavg"
    flags = (
        Flag("server_momentum", float, 0.0, "FedAvgM server momentum b (0 = FedAvg)",
             "the published code's flag; FedAvgM runs use 0.9 (seed's command line)"),
        Flag("server_lr", float, 1.0, "FedAvgM server learning rate", "Hsu et al. 2019"),
    )

    def server_update(self, server_state, results, server):
        """Sample-weighted average, then server momentum when --server_momentum > 0."""
        global_weights = server_state["weights"]
        server_state = super().server_update(server_state, results, server)
        b = self.args.server_momentum
        if b == 0:
            return server_state
        averaged = server_state["weights"]
        velocity = server_state.setdefault("velocity", {})
        new_weights = {}
        for key, w in global_weights.items():
            if not w.is_floating_point():
                new_weights[key] = averaged[key]
                continue
            delta = w - averaged[key]
            velocity[key] = b * velocity[key] + delta if key in velocity else delta.clone()
            new_weights[key] = w - self.args.server_lr * velocity[key]
        server_state["weights"] = new_weights
        return server_state


if __name__ == "__main__":
    sys.exit(main(FedAvg))

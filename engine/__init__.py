"""The federated engine: one round loop for every algorithm.

    engine/algorithm.py   the interface an algorithm implements (defaults: FedAvg), Flag, contexts
    engine/loop.py        the round loop (Run) and main(), the entry point of every script
    engine/data.py        the clients' data, loaded in one place; evaluation splits
    engine/evaluation.py  the protocols of --eval: global, local, groups
    engine/observers.py   observers of every download and upload; the byte counter
    engine/checkpoint.py  checkpoints; engine/rundir.py: run directories, logs, metrics
    engine/executors.py   clients in this process; engine/parallel.py: worker processes, Ray
    engine/registry.py    every algorithm by name; engine/jobs.py: run.sh's scheduler
"""
# Names are imported on first use (PEP 562), so `from engine import registry` needs no torch.
_EXPORTS = {
    "Algorithm": "engine.algorithm", "ClientContext": "engine.algorithm", "ClientResult": "engine.algorithm",
    "Flag": "engine.algorithm", "ServerContext": "engine.algorithm", "TrainingDiverged": "engine.algorithm",
    "clone_weights": "engine.algorithm", "weighted_average": "engine.algorithm", "split_head": "engine.algorithm",
    "Run": "engine.loop", "main": "engine.loop", "sample_clients": "engine.loop",
    "Observer": "engine.observers", "payload_bytes": "engine.observers",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")

"""Checkpoints: everything a resume needs, written atomically.

    format, config, round, server_state, client_states ({client: state} for clients whose
    state is not empty), best_acc, log_lines (count), metrics_records (count)
    [client_models: {client: last uploaded weights}, with --keep_client_models]

The server state holds the global weights and whatever the algorithm keeps on the server
(momentum, control variates, a generator and its optimiser's state); client states only what
the algorithm keeps per client. RNG state is not saved: every draw comes from generators
derived from (init_seed, round, client | "server").
"""
import os

import torch

from utils import UsageError, atomic_torch_save

CHECKPOINT_FORMAT = 2


def save_checkpoint(path, config, round_index, server_state, client_states, best_acc, log_lines, records,
                    client_models=None):
    """`client_models` (--keep_client_models): every client's last uploaded weights, for warm
    starts of algorithms that use them (FedHUG's drift, MOON's previous model)."""
    checkpoint = {
        "format": CHECKPOINT_FORMAT, "config": config, "round": round_index, "server_state": server_state,
        "client_states": {k: state for k, state in enumerate(client_states) if state},
        "best_acc": best_acc, "log_lines": log_lines, "metrics_records": records,
    }
    if client_models is not None:
        checkpoint["client_models"] = client_models
    atomic_torch_save(checkpoint, path)


def load_checkpoint(path):
    """Read a checkpoint file or the checkpoint of a run directory; one clear error if unusable."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint at {path} (the run wrote none yet, or the path is wrong)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}); "
                         "use an intact checkpoint")
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise UsageError(f"{path} is not a checkpoint of this suite")
    if ckpt.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} has checkpoint format {ckpt.get('format')!r}; this suite reads format "
                         f"{CHECKPOINT_FORMAT} (runs made before the engine's reshaping cannot be resumed; "
                         "rerun them, or warm-start from their global_model.pt with --load_path)")
    ckpt["path"] = path
    return ckpt


def client_states_from(ckpt, n_parties):
    states = [{} for _ in range(n_parties)]
    for k, state in ckpt["client_states"].items():
        states[int(k)] = state
    return states


def check_same(what, expected, found, path):
    """Refuse a checkpoint whose values differ from `expected`, naming every difference."""
    diffs = [f"{k}: {found.get(k)!r} in the checkpoint, {expected.get(k)!r} here"
             for k in sorted(set(expected) | set(found)) if expected.get(k) != found.get(k)]
    if diffs:
        raise UsageError(f"checkpoint {path} does not match this {what}: " + "; ".join(diffs))

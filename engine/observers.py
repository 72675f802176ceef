"""Observers: tools that see every download and upload of a run without touching the algorithm.

The round loop calls, in the driver and in sampled order (whatever executor ran the clients):

    observer.on_download(round, client_id, download, server_state)  before the round's clients run
    observer.on_upload(round, client_id, download, result)           for every ClientResult, before aggregation
    observer.end_round(round) -> dict                                 merged into the round's metrics record

`download` is exactly what the client received and `result.upload` exactly what it sent
(result.metrics has its step count; the run's flags are the optimiser's hyper-parameters).
The communication counter below is one; the privacy harness is another.
"""
from collections import defaultdict

import torch


def payload_bytes(obj):
    """Bytes of a payload: tensors at their element size, numbers as 8 bytes, strings as UTF-8,
    containers as the sum of their items (keys are names, not counted)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    if isinstance(obj, (bool, int, float)):
        return 8
    if isinstance(obj, str):
        return len(obj.encode())
    return 0


class Observer:
    """The no-op base: override what you need."""

    def on_download(self, round_index, client_id, download, server_state):
        pass

    def on_upload(self, round_index, client_id, download, result):
        pass

    def end_round(self, round_index):
        return {}


class CommunicationCounter(Observer):
    """Bytes each round, per direction: total, per client (in sampled order) and per kind (the
    top-level keys of a payload, e.g. weights, control, prototypes; an upload's sample count is
    the kind num_samples)."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.down, self.up = {}, {}
        self.down_kinds, self.up_kinds = defaultdict(int), defaultdict(int)

    def on_download(self, round_index, client_id, download, server_state):
        self.down[client_id] = payload_bytes(download)
        for kind, value in download.items():
            self.down_kinds[kind] += payload_bytes(value)

    def on_upload(self, round_index, client_id, download, result):
        payload = dict(result.upload, num_samples=result.num_samples)
        self.up[client_id] = payload_bytes(payload)
        for kind, value in payload.items():
            self.up_kinds[kind] += payload_bytes(value)

    def end_round(self, round_index):
        record = {"bytes_uploaded": sum(self.up.values()), "bytes_downloaded": sum(self.down.values()),
                  "bytes_uploaded_per_client": list(self.up.values()),
                  "bytes_downloaded_per_client": list(self.down.values()),
                  "bytes_uploaded_by_kind": dict(self.up_kinds),
                  "bytes_downloaded_by_kind": dict(self.down_kinds)}
        self.reset()
        return record

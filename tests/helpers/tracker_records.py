"""What W&B (offline) and MLflow (file store) recorded of a run: for the tracker tests."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

from mlflow.tracking import MlflowClient
from wandb.proto import wandb_internal_pb2

WANDB_BLOCK = 32768  # the transaction log's blocks (LevelDB's log format)
WANDB_HEADER = 7  # the file's ":W&B" + magic + version, and each chunk's crc + length + type
FULL, LAST = 1, 4


def _wandb_records(path: Path):
    data, pos, pending = path.read_bytes(), WANDB_HEADER, b""
    while pos + WANDB_HEADER <= len(data):
        left = WANDB_BLOCK - pos % WANDB_BLOCK
        if left < WANDB_HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + WANDB_HEADER])
        pending += data[pos + WANDB_HEADER : pos + WANDB_HEADER + length]
        pos += WANDB_HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
            pending = b""


def wandb_history(run_dir: Path) -> list[tuple[int, str, object]]:
    """(step, key, value) of every value logged to the offline W&B runs under `run_dir`, in
    the order logged (runs by start time; W&B's own `_` keys left out)."""
    found = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in _wandb_records(path):
            if record.WhichOneof("record_type") != "history":
                continue
            row: dict = {}
            for item in record.history.item:  # an image's fields are nested under its key
                key, *field = [item.key] if item.key else item.nested_key
                value = json.loads(item.value_json)
                if field:
                    row.setdefault(key, {})["/".join(field)] = value
                else:
                    row[key] = value
            step = row.pop("step")
            found += [(step, k, v) for k, v in row.items() if not k.startswith("_")]
    return found


def mlflow_history(uri: str, run_id: str) -> list[tuple[int, str, float]]:
    """(step, key, value) of every metric value of MLflow run `run_id`, by key then step."""
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow >= 3.7 asks for it
    client = MlflowClient(tracking_uri=uri)
    keys = sorted(client.get_run(run_id).data.metrics)
    return [(m.step, key, m.value) for key in keys for m in client.get_metric_history(run_id, key)]

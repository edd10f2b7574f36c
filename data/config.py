"""The data section of a run's config (`data.*`): the dataset, the trained length, the batch
and the training mixture. Plain dataclasses that double as the OmegaConf schema
(training/config.py composes them into the run's `Config`)."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_SEQ_LEN = 2**25


@dataclass
class StreamConfig:
    path: str = ""  # a dataset from `python -m data.prepare`: local path or remote URL (s3://...)
    proportion: float | None = None  # share of the training tokens (normalised); all or none set


@dataclass
class DataConfig:
    path: str = "data/default"  # a dataset from `python -m data.prepare` (tokenizer, val split)
    # The trained length L_train.
    seq_len: int = field(default=128, metadata={"min": 2, "max": MAX_SEQ_LEN})
    batch_size: int = field(default=16, metadata={"min": 1})  # sequences per rank per micro-step
    # "boundaries": packed documents, no attention across them; "concat": one plain stream.
    packing: str = field(default="boundaries", metadata={"choices": ["boundaries", "concat"]})
    num_workers: int = field(default=0, metadata={"min": 0})
    # Training mixture; empty: the train split of `path`. Same tokenizer as `path` required.
    streams: list[StreamConfig] = field(default_factory=list)
    cache_dir: str | None = None  # local shard cache; None: <tmp>/rotalibi-streaming

"""Data sets in the object store: shards and a test split as blobs, and a manifest that lists them.

The manifest (JSON) records, for every shard, its key, sample count and sha256; a reader checks the
sha256 of what it fetched against the manifest before using it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import torch

from pipeline import blobs
from pipeline.data import Dataset, shard_indices, tensor_digest
from storage import keys
from storage.objectstore import ObjectNotFound, ObjectStore


@dataclass(frozen=True)
class Manifest:
    dataset_id: str
    name: str
    shards: list[dict[str, Any]]  # [{key, samples, sha256}]
    test: dict[str, Any]  # {key, samples, sha256}
    meta: dict[str, Any]

    @property
    def shard_sizes(self) -> list[int]:
        return [int(s["samples"]) for s in self.shards]

    def to_json(self) -> str:
        return json.dumps(
            {"dataset_id": self.dataset_id, "name": self.name, "shards": self.shards, "test": self.test,
             "meta": self.meta},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        d = json.loads(text)
        return cls(d["dataset_id"], d["name"], d["shards"], d["test"], d.get("meta", {}))


def dataset_id(ds: Dataset, shards: int, seed: int) -> str:
    digest = tensor_digest(ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in str(ds.meta.get("name", "data")))[:40]
    return f"{name}-{digest[:12]}-n{shards}-s{seed}"


def write_dataset(store: ObjectStore, ds: Dataset, shards: int, seed: int) -> Manifest:
    """Shard the training split and upload shards, test split and manifest (skipped if already there)."""
    did = dataset_id(ds, shards, seed)
    mkey = keys.dataset_manifest(did)
    try:
        return Manifest.from_json(store.get(mkey))
    except ObjectNotFound:
        pass
    entries = []
    for i, idx in enumerate(shard_indices(ds.n_train, shards, seed)):
        data = blobs.encode({"x": ds.x_train[idx], "y": ds.y_train[idx]}, {"kind": "shard", "shard": i})
        key = keys.dataset_shard(did, i)
        store.put(key, data)
        entries.append({"key": key, "samples": int(idx.numel()), "sha256": blobs.sha256_hex(data)})
    tdata = blobs.encode({"x": ds.x_test, "y": ds.y_test}, {"kind": "test"})
    store.put(keys.dataset_test(did), tdata)
    test = {"key": keys.dataset_test(did), "samples": int(ds.x_test.shape[0]), "sha256": blobs.sha256_hex(tdata)}
    manifest = Manifest(did, str(ds.meta.get("name", "")), entries, test, dict(ds.meta))
    # The manifest is written last: it is the commit point of the data set.
    store.put(mkey, manifest.to_json().encode())
    return manifest


def read_split(store: ObjectStore, entry: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Fetch one shard (or the test split), verify its sha256 against the manifest; returns (x, y, bytes)."""
    data = store.get(entry["key"])
    if blobs.sha256_hex(data) != entry["sha256"]:
        raise blobs.BlobError(entry["key"], "sha256 differs from the data set manifest")
    blob = blobs.decode(data, entry["key"])
    return blob.tensors["x"], blob.tensors["y"], len(data)

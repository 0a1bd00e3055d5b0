"""The model registry on fakeredis + a local folder: versions, idempotency, aliases, retention, events."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import torch
from fastapi.testclient import TestClient

from pipeline.artifacts import build_artifact
from pipeline.client import cli_models
from pipeline.models import build_model, default_args
from pipeline.settings import Settings
from storage import keys
from storage.objectstore import LocalStore
from storage.registry import (
    AliasError,
    ArtifactCorrupt,
    InvalidArtifact,
    InvalidName,
    Registry,
    UnknownModel,
    UnknownVersion,
    VersionInUse,
)
from workers.registry_api import create_app

M = "digits-cnn"


def artifact(seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    data, _ = build_artifact(M, default_args(M), build_model(M).state_dict())
    return data


@pytest.fixture(scope="module")
def blob() -> bytes:
    return artifact()


@pytest.fixture
def r() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "store")


@pytest.fixture
def reg(r: fakeredis.FakeRedis, store: LocalStore) -> Registry:
    return Registry(r, store)


def register(reg: Registry, blob: bytes, acc: float = 0.5, **kw: Any) -> int:
    lineage = {"job": "j1", "round": 1, "parent_version": None, "data_manifest": "abc"}
    return reg.register(M, blob, codec="fp32+zstd", metrics={"accuracy": acc}, lineage=lineage, **kw).version


def test_versions_are_monotonic_and_numbers_are_never_reused(reg: Registry, blob: bytes) -> None:
    assert [register(reg, blob) for _ in range(3)] == [1, 2, 3]
    reg.delete_version(M, 3)
    assert register(reg, blob) == 4
    rec = reg.get(M, 4)
    assert rec.artifact_key == keys.artifact(M, 4) and rec.size == len(blob) and rec.codec == "fp32+zstd"
    assert [v.version for v in reg.list_versions(M)] == [1, 2, 4]
    assert reg.list_models() == [M]


def test_a_second_register_with_the_same_idempotency_key_returns_the_first_record(
    reg: Registry, store: LocalStore, blob: bytes
) -> None:
    first = reg.register(M, blob, codec="c", metrics={}, lineage={}, idempotency_key="job1:7")
    again = reg.register(M, artifact(1), codec="c", metrics={}, lineage={}, idempotency_key="job1:7")
    assert again == first
    assert [v.version for v in reg.list_versions(M)] == [1]
    assert list(store.list("models/")) == [first.artifact_key]
    assert [e.type for e in reg.events_since()] == ["registered"]


def test_a_redelivery_racing_the_first_delivery_registers_once_and_leaves_no_orphan(
    r: fakeredis.FakeRedis, tmp_path: Path, blob: bytes
) -> None:
    class RacingStore(LocalStore):
        """The first upload lets a concurrent delivery of the same key complete first."""

        raced = False

        def put(self, key: str, data: bytes) -> None:
            super().put(key, data)
            if not self.raced:
                self.raced = True
                reg.register(M, blob, codec="c", metrics={}, lineage={}, idempotency_key="job1:1")

    store = RacingStore(tmp_path / "s")
    reg = Registry(r, store)
    rec = reg.register(M, blob, codec="c", metrics={}, lineage={}, idempotency_key="job1:1")
    assert rec.version == 2  # the racing delivery committed v2 first; this one's v1 upload was discarded
    assert [v.version for v in reg.list_versions(M)] == [2]
    assert list(store.list("models/")) == [keys.artifact(M, 2)]


def test_promote_if_better_moves_the_alias_only_when_accuracy_does_not_drop(reg: Registry, blob: bytes) -> None:
    assert register(reg, blob, 0.80, promote_if_better="production") == 1
    assert reg.aliases(M) == {"production": 1}  # no current target: promoted
    register(reg, blob, 0.70, promote_if_better="production")
    assert reg.aliases(M) == {"production": 1}
    register(reg, blob, 0.80, promote_if_better="production")
    assert reg.aliases(M) == {"production": 3}
    assert reg.alias_history(M, "production") == [1]
    types = [(e.type, e.version) for e in reg.events_since()]
    assert types == [("registered", 1), ("alias", 1), ("registered", 2), ("registered", 3), ("alias", 3)]


def test_rollback_returns_to_the_previous_target_and_repeated_rollbacks_walk_back(reg: Registry, blob: bytes) -> None:
    for _ in range(3):
        reg.set_alias(M, "production", register(reg, blob))
    assert reg.resolve(M, "production").version == 3
    assert reg.rollback(M, "production").version == 2
    assert reg.rollback(M, "production").version == 1
    with pytest.raises(AliasError, match="no earlier version"):
        reg.rollback(M, "production")
    with pytest.raises(AliasError, match="no alias 'staging'"):
        reg.rollback(M, "staging")


def test_set_alias_to_an_unknown_version_or_bad_names_is_refused(reg: Registry, blob: bytes) -> None:
    register(reg, blob)
    with pytest.raises(UnknownVersion, match="no version 9"):
        reg.set_alias(M, "production", 9)
    with pytest.raises(UnknownModel):
        reg.set_alias("nope", "production", 1)
    with pytest.raises(InvalidName):
        reg.set_alias(M, "42", 1)
    with pytest.raises(InvalidName):
        reg.register("../etc", blob, codec="c", metrics={}, lineage={})
    with pytest.raises(InvalidName):
        reg.register("name\n", blob, codec="c", metrics={}, lineage={})
    with pytest.raises(UnknownModel, match="unknown model 'nope'"):
        reg.list_versions("nope")


def test_delete_is_refused_while_an_alias_points_at_the_version(reg: Registry, store: LocalStore, blob: bytes) -> None:
    v1, v2 = register(reg, blob), register(reg, blob)
    reg.set_alias(M, "production", v1)
    reg.set_alias(M, "production", v2)
    with pytest.raises(VersionInUse, match="alias"):
        reg.delete_version(M, v2)
    reg.delete_version(M, v1)
    assert not store.exists(keys.artifact(M, v1))
    assert reg.alias_history(M, "production") == []  # a rollback can no longer land on a deleted version
    with pytest.raises(UnknownVersion):
        reg.get(M, v1)
    assert reg.events_since()[-1].type == "deleted"


def test_retention_keeps_the_last_n_plus_aliased_versions_and_the_rollback_target(reg: Registry, blob: bytes) -> None:
    vs = [register(reg, blob) for _ in range(8)]
    reg.set_alias(M, "production", vs[1])
    reg.set_alias(M, "production", vs[2])
    reg.set_alias(M, "staging", vs[4])
    deleted = reg.apply_retention(M, keep_last=2)
    assert deleted == [1, 4, 6]
    assert [v.version for v in reg.list_versions(M)] == [2, 3, 5, 7, 8]
    assert reg.rollback(M, "production").version == 2


def test_a_half_written_artifact_is_never_visible(r: fakeredis.FakeRedis, tmp_path: Path, blob: bytes) -> None:
    seen: list[list[str]] = []

    class TornStore(LocalStore):
        """Records what the registry shows mid-upload, then loses the tail of the object."""

        def put(self, key: str, data: bytes) -> None:
            seen.append(reg.list_models())
            super().put(key, data[: len(data) // 2])

    store = TornStore(tmp_path / "s")
    reg = Registry(r, store)
    with pytest.raises(InvalidArtifact, match="does not match what was uploaded"):
        register(reg, blob)
    assert seen == [[]]
    assert reg.list_models() == [] and reg.events_since() == []
    assert list(store.list("")) == []  # the torn object was removed


def test_corrupt_bytes_are_refused_at_register(reg: Registry, store: LocalStore, blob: bytes) -> None:
    bad = bytearray(blob)
    bad[-10] ^= 0xFF
    with pytest.raises(InvalidArtifact, match="blake3 mismatch"):
        register(reg, bytes(bad))
    with pytest.raises(InvalidArtifact, match="not an AaS blob"):
        register(reg, b"garbage" * 10)
    assert reg.list_models() == [] and list(store.list("")) == []


def test_fetch_refuses_an_artifact_changed_or_lost_after_registration(
    reg: Registry, store: LocalStore, blob: bytes
) -> None:
    v = register(reg, blob)
    assert reg.fetch_artifact(M, v) == blob
    flipped = bytearray(blob)
    flipped[len(blob) // 2] ^= 0x01
    store.put(keys.artifact(M, v), bytes(flipped))
    with pytest.raises(ArtifactCorrupt, match="does not match its record"):
        reg.fetch_artifact(M, v)
    store.delete(keys.artifact(M, v))
    with pytest.raises(ArtifactCorrupt, match="missing"):
        reg.fetch_artifact(M, v)


def test_a_subscriber_catches_up_from_its_last_event_id(reg: Registry, blob: bytes) -> None:
    v1 = register(reg, blob)
    reg.set_alias(M, "production", v1)
    seen_up_to = reg.latest_event_id()
    # ... the subscriber goes down; changes keep coming ...
    v2 = register(reg, blob)
    reg.set_alias(M, "production", v2)
    reg.rollback(M, "production")
    missed = reg.events_since(seen_up_to)
    assert [(e.type, e.version, e.alias, e.previous) for e in missed] == [
        ("registered", 2, "", None),
        ("alias", 2, "production", 1),
        ("alias", 1, "production", 2),
    ]
    assert reg.events_since(missed[-1].id) == []
    assert [e.version for e in reg.events_since(missed[0].id, count=1)] == [2]


def test_non_finite_metrics_are_stored_as_null(reg: Registry, blob: bytes) -> None:
    rec = reg.register(M, blob, codec="c", metrics={"loss": float("nan"), "accuracy": 0.1}, lineage={})
    assert reg.get(M, rec.version).metrics == {"loss": None, "accuracy": 0.1}


# ---------------------------------------------------------------- HTTP service


@pytest.fixture
def client(reg: Registry) -> TestClient:
    settings = Settings(registry_token="s3cret", _env_file=None)  # type: ignore[call-arg]
    return TestClient(create_app(settings, registry=reg))


AUTH = {"Authorization": "Bearer s3cret"}


def test_registry_api_reads_are_open_and_writes_need_the_token(client: TestClient, reg: Registry, blob: bytes) -> None:
    v1, v2 = register(reg, blob), register(reg, blob)
    assert client.get("/v1/models").json() == {"models": [{"name": M, "latest": 2, "versions": 2, "aliases": {}}]}
    assert client.post(f"/v1/models/{M}/aliases/production", json={"version": v1}).status_code == 401
    bad = {"Authorization": "Bearer nope"}
    assert client.post(f"/v1/models/{M}/aliases/production", json={"version": v1}, headers=bad).status_code == 401
    resp = client.post(f"/v1/models/{M}/aliases/production", json={"version": v2}, headers=AUTH)
    assert resp.json() == {"model": M, "alias": "production", "version": 2}
    assert client.get(f"/v1/models/{M}/versions/production").json()["version"] == 2
    assert client.get(f"/v1/models/{M}/versions/1").json()["sha256"] == reg.get(M, 1).sha256
    body = client.get(f"/v1/models/{M}").json()
    assert body["aliases"] == {"production": 2} and [v["version"] for v in body["versions"]] == [1, 2]
    assert client.get("/healthz").status_code == 200


def test_registry_api_answers_bad_input_with_json_4xx(client: TestClient, reg: Registry, blob: bytes) -> None:
    v1, v2 = register(reg, blob), register(reg, blob)
    client.post(f"/v1/models/{M}/aliases/production", json={"version": v1}, headers=AUTH)
    cases = [
        (client.get("/v1/models/nope"), 404),
        (client.get(f"/v1/models/{M}/versions/99"), 404),
        (client.get(f"/v1/models/{M}/versions/canary"), 404),
        (client.delete(f"/v1/models/{M}/versions/{v1}", headers=AUTH), 409),
        (client.delete(f"/v1/models/{M}/versions/abc", headers=AUTH), 422),
        (client.post(f"/v1/models/{M}/aliases/production", json={"version": "x"}, headers=AUTH), 422),
        (client.post(f"/v1/models/{M}/aliases/production", content=b"{not json", headers=AUTH), 422),
        (client.post(f"/v1/models/{M}/aliases/production/rollback", headers=AUTH), 409),
        (client.get("/v1/models/bad%20name"), 422),
        (client.get("/nowhere"), 404),
    ]
    for resp, status in cases:
        assert resp.status_code == status, resp.text
        assert isinstance(resp.json()["error"], str)
    assert client.delete(f"/v1/models/{M}/versions/{v2}", headers=AUTH).json() == {"model": M, "deleted": v2}


# ---------------------------------------------------------------- CLI


def cli(reg: Registry, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="aas")
    cli_models.register_cli(parser.add_subparsers(dest="command", required=True))
    return cli_models.run(parser.parse_args(["models", *argv]), registry=reg)


def test_cli_lists_promotes_rolls_back_and_deletes(
    reg: Registry, blob: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    v1, v2 = register(reg, blob), register(reg, blob)
    assert cli(reg, "promote", M, str(v1)) == 0 and cli(reg, "promote", M, str(v2)) == 0
    assert cli(reg, "rollback", M) == 0
    capsys.readouterr()
    assert cli(reg, "list") == 0
    out = capsys.readouterr().out
    assert "MODEL" in out and "production=v1" in out
    assert cli(reg, "show", M, "--json") == 0
    assert json.loads(capsys.readouterr().out)["aliases"] == {"production": 1}
    assert cli(reg, "show", M, "--version", "production") == 0
    assert "sha256:" in capsys.readouterr().out
    assert cli(reg, "delete", M, str(v1)) == 2
    assert "alias" in capsys.readouterr().err
    assert cli(reg, "delete", M, str(v2)) == 0

"""HTTP fuzzing: schemathesis drives the registry service and the inference worker from their own OpenAPI.

Both apps run in-process (ASGI) on fakeredis and a local folder, with a registered, served version, so
the generated requests reach real handlers. Valid and invalid requests (schemathesis's positive and
negative modes) must never get a 5xx, and the service must still answer normally afterwards.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from pipeline.artifacts import build_artifact
from pipeline.models import build_model, default_args
from pipeline.settings import Settings
from storage.objectstore import LocalStore
from storage.registry import Registry

pytestmark = pytest.mark.integration

M = "digits-cnn"
TOKEN = "fuzz-token"
EXAMPLES = 300  # per service; 5-20 s each on two cores


def _registry_with_versions(root: Path, versions: int = 3) -> Registry:
    reg = Registry(fakeredis.FakeRedis(), LocalStore(root))
    for _ in range(versions):
        data, _ = build_artifact(M, default_args(M), build_model(M).state_dict())
        rec = reg.register(M, data, codec="fp32+zstd", metrics={"accuracy": 0.5}, lineage={"job": "fuzz"})
        reg.set_alias(M, "production", rec.version)
    return reg


def registry_service(root: Path) -> tuple[Any, Callable[[TestClient], None]]:
    from workers.registry_api import create_app

    app = create_app(Settings(_env_file=None, registry_token=TOKEN), registry=_registry_with_versions(root))

    def healthy(client: TestClient) -> None:
        assert client.get("/healthz").status_code == 200
        assert client.get(f"/v1/models/{M}").json()["name"] == M

    return app, healthy


def inference_worker(root: Path) -> tuple[Any, Callable[[TestClient], None]]:
    from workers.inference import create_app

    s = Settings(_env_file=None, max_predict_batch=64, insecure_dev=True)  # unsigned on purpose
    app = create_app(M, settings=s, registry=_registry_with_versions(root),
                     follow=False)
    assert app.state.server.sync()

    def healthy(client: TestClient) -> None:
        assert client.get("/healthz").json()["status"] == "ok"
        resp = client.post(f"/v1/models/{M}/predict", json={"inputs": [[0.0] * 64]})
        assert resp.status_code == 200 and len(resp.json()["predictions"]) == 1

    return app, healthy


@pytest.mark.parametrize("service", [registry_service, inference_worker], ids=["registry", "inference"])
def test_fuzzed_requests_never_get_a_server_error_and_the_service_keeps_serving(
        tmp_path: Path, service: Callable[[Path], tuple[Any, Callable[[TestClient], None]]]) -> None:
    app, healthy = service(tmp_path / "store")
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    cases = st.one_of(
        schema.as_strategy(GenerationMode.POSITIVE),
        schema.as_strategy(GenerationMode.NEGATIVE),
        schema.as_strategy(GenerationMode.POSITIVE, path_parameters={"name": M}),  # past the 404 for unknown names
        schema.as_strategy(GenerationMode.NEGATIVE, path_parameters={"name": M}),
    )
    statuses: Counter[int] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=cases, with_token=st.booleans())
    def fuzz(case: Any, with_token: bool) -> None:
        resp = case.call(headers=auth if with_token else None)
        statuses[resp.status_code] += 1
        assert resp.status_code < 500, (
            f"{case.method} {case.formatted_path} query={case.query} body={str(case.body)[:200]} "
            f"→ {resp.status_code}: {resp.text[:300]}"
        )

    fuzz()
    assert sum(statuses.values()) >= EXAMPLES // 2
    assert any(200 <= s < 300 for s in statuses), f"no request got through: {statuses}"
    healthy(TestClient(app))

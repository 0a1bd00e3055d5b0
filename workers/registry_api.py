"""HTTP face of the model registry (FastAPI; OpenAPI at /docs). Reads are open; writes need the token.

Run: ``python -m workers.registry_api --host 127.0.0.1 --port 8200``. Write endpoints require
``Authorization: Bearer <AAS_REGISTRY_TOKEN>``, checked before the body is read; without a non-empty token
the service refuses to start (``AAS_INSECURE_DEV=1``: it starts read-only). Every error is JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import sys
from typing import Any

import redis
from fastapi import FastAPI, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from pipeline.security import registry_token
from pipeline.settings import Settings, get_settings
from storage.objectstore import StoreError
from storage.registry import (
    AliasError,
    ArtifactCorrupt,
    InvalidArtifact,
    InvalidName,
    Registry,
    RegistryError,
    RegistryForbidden,
    UnknownAlias,
    UnknownModel,
    UnknownVersion,
    VersionInUse,
)
from storage.services import build_services, redis_client
from workers.http_limits import BodyLimit, add_json_errors, error_responses, json_error

log = logging.getLogger("aas.registry_api")

MAX_BODY_BYTES = 4096  # the largest write body is {"version": N}
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
READ_ERRORS = error_responses(404, 408, 413, 422, 503)
WRITE_ERRORS = error_responses(401, 403, 404, 408, 409, 413, 422, 503)

# Registry errors → HTTP status. Anything else a RegistryError says is a 400.
STATUS: list[tuple[type[RegistryError], int]] = [
    (UnknownModel, 404),
    (UnknownVersion, 404),
    (UnknownAlias, 404),
    (InvalidName, 422),
    (InvalidArtifact, 422),
    (RegistryForbidden, 403),
    (VersionInUse, 409),
    (AliasError, 409),
    (ArtifactCorrupt, 409),
]


class AliasBody(BaseModel):
    version: int = Field(ge=1, description="version the alias should point at")


class Unauthorized(Exception):
    pass


def _status(e: RegistryError) -> int:
    return next((code for cls, code in STATUS if isinstance(e, cls)), 400)


def registry_from_settings(settings: Settings) -> Registry:
    return build_services(settings, redis_conn=redis_client(settings, socket_timeout_s=10)).registry()


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """The registry service. Pass `registry` to serve one you built (tests: fakeredis + LocalStore)."""
    s = settings or get_settings()
    reg = registry or registry_from_settings(s)
    token = registry_token(s)
    app = FastAPI(title="AaS model registry", version="1")
    bearer = HTTPBearer(auto_error=False, description="AAS_REGISTRY_TOKEN; required by every write")

    def refusal(headers: Any, method: str, path: str) -> JSONResponse | None:
        """Writes without the token are refused here, before a byte of their body is read."""
        if method not in WRITE_METHODS:
            return None
        if token is None:
            log.warning("refused %s %s: no AAS_REGISTRY_TOKEN is configured, writes are disabled", method, path)
            return json_error(403, "registry writes are disabled: the service has no AAS_REGISTRY_TOKEN")
        scheme, _, given = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            log.warning("refused %s %s: missing or wrong bearer token", method, path)
            return json_error(401, "this endpoint needs 'Authorization: Bearer <token>' with the registry token",
                              headers={"WWW-Authenticate": "Bearer"})
        return None

    def require_token(request: Request, _: Any = Security(bearer)) -> None:
        # Checked already by BodyLimit before the body was read; again here so no route depends on the order.
        if refusal(request.headers, request.method, request.url.path) is not None:
            raise Unauthorized()

    app.add_middleware(BodyLimit, max_bytes=MAX_BODY_BYTES, read_timeout_s=s.request_read_timeout_s,
                       authorize=refusal)
    add_json_errors(app)

    @app.exception_handler(Unauthorized)
    async def _unauthorized(_: Request, __: Unauthorized) -> JSONResponse:
        return JSONResponse(
            {"error": "this endpoint needs 'Authorization: Bearer <token>' with the registry token"},
            status_code=401,
            headers={"WWW-Authenticate": "Bearer"},
        )

    @app.exception_handler(RegistryError)
    async def _registry_error(_: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=_status(exc))

    @app.exception_handler(redis.RedisError)
    async def _redis_down(_: Request, exc: redis.RedisError) -> JSONResponse:
        log.error("redis failed: %s", exc)
        return JSONResponse({"error": f"registry storage unavailable: Redis at {s.redis_display()}"}, status_code=503)

    @app.exception_handler(StoreError)
    async def _store_down(_: Request, exc: StoreError) -> JSONResponse:
        return JSONResponse({"error": f"object store failed: {exc}"}, status_code=503)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        parts = ["/".join(str(p) for p in e.get("loc", ())) + ": " + e.get("msg", "") for e in exc.errors()]
        return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)

    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    def model_summary(name: str) -> dict[str, Any]:
        versions = reg.list_versions(name)
        return {
            "name": name,
            "latest": versions[-1].version if versions else None,
            "versions": len(versions),
            "aliases": reg.aliases(name),
        }

    @app.get("/v1/models", responses=READ_ERRORS)
    def list_models() -> dict[str, Any]:
        return {"models": [model_summary(m) for m in reg.list_models()]}

    @app.get("/v1/models/{name}", responses=READ_ERRORS)
    def show_model(name: str) -> dict[str, Any]:
        versions = reg.list_versions(name)
        aliases = reg.aliases(name)
        return {
            "name": name,
            "aliases": aliases,
            "alias_history": {a: reg.alias_history(name, a) for a in aliases},
            "versions": [r.to_dict() for r in versions],
        }

    @app.get("/v1/models/{name}/versions/{ref}", responses=READ_ERRORS)
    def show_version(name: str, ref: str) -> dict[str, Any]:
        """`ref` is a version number, an alias, or ``latest``."""
        rec = reg.resolve(name, ref)
        return {**rec.to_dict(), "aliases": sorted(a for a, v in reg.aliases(name).items() if v == rec.version)}

    @app.post("/v1/models/{name}/aliases/{alias}", dependencies=[Security(require_token)], responses=WRITE_ERRORS)
    def set_alias(name: str, alias: str, body: AliasBody) -> dict[str, Any]:
        rec = reg.set_alias(name, alias, body.version)
        return {"model": name, "alias": alias, "version": rec.version}

    @app.post("/v1/models/{name}/aliases/{alias}/rollback", dependencies=[Security(require_token)],
              responses=WRITE_ERRORS)
    def rollback(name: str, alias: str) -> dict[str, Any]:
        rec = reg.rollback(name, alias)
        return {"model": name, "alias": alias, "version": rec.version}

    @app.delete("/v1/models/{name}/versions/{version}", dependencies=[Security(require_token)],
                responses=WRITE_ERRORS)
    def delete_version(name: str, version: int) -> dict[str, Any]:
        reg.delete_version(name, version)
        return {"model": name, "deleted": version}

    @app.get("/healthz", responses=error_responses(503))
    def healthz() -> JSONResponse:
        problems = []
        try:
            reg.redis.ping()
        except redis.RedisError as e:
            problems.append(f"redis {s.redis_display()}: {e}")
        try:
            reg.store.check()
        except StoreError as e:
            problems.append(f"store: {e}")
        body = {"status": "ok" if not problems else "degraded", "problems": problems}
        return JSONResponse(body, status_code=503 if problems else 200)

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workers.registry_api", description="AaS model registry HTTP service")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8200)
    p.add_argument("--log-level", default="info")
    args = p.parse_args(argv)
    import uvicorn

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = get_settings()
    if registry_token(settings) is None:
        if not settings.insecure_dev:
            print("error: the registry refuses to start without AAS_REGISTRY_TOKEN (a non-empty bearer token for "
                  "writes); set it, or AAS_INSECURE_DEV=1 to run it read-only on a development machine",
                  file=sys.stderr, flush=True)
            return 2
        log.warning("no AAS_REGISTRY_TOKEN: serving read-only (every write answers 403)")
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_keep_alive=5, limit_concurrency=256)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

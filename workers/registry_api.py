"""HTTP face of the model registry (FastAPI; OpenAPI at /docs). Reads are open; writes need the token.

Run: ``python -m workers.registry_api --host 127.0.0.1 --port 8200``. With ``AAS_REGISTRY_TOKEN`` set,
write endpoints require ``Authorization: Bearer <token>``. Every error is JSON ``{"error": "..."}``.
"""

from __future__ import annotations

import argparse
import hmac
import logging
from typing import Any

import redis
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from pipeline.settings import Settings, get_settings
from storage.objectstore import StoreError, open_store
from storage.registry import (
    AliasError,
    ArtifactCorrupt,
    InvalidArtifact,
    InvalidName,
    Registry,
    RegistryError,
    UnknownAlias,
    UnknownModel,
    UnknownVersion,
    VersionInUse,
)

log = logging.getLogger("aas.registry_api")

# Registry errors → HTTP status. Anything else a RegistryError says is a 400.
STATUS: list[tuple[type[RegistryError], int]] = [
    (UnknownModel, 404),
    (UnknownVersion, 404),
    (UnknownAlias, 404),
    (InvalidName, 422),
    (InvalidArtifact, 422),
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
    r = redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=5)
    key = settings.signing_key.get_secret_value().encode() if settings.signing_key else None
    return Registry(r, open_store(settings), signing_key=key)


def create_app(settings: Settings | None = None, registry: Registry | None = None) -> FastAPI:
    """The registry service. Pass `registry` to serve one you built (tests: fakeredis + LocalStore)."""
    s = settings or get_settings()
    reg = registry or registry_from_settings(s)
    token = s.registry_token.get_secret_value().encode() if s.registry_token else None
    app = FastAPI(title="AaS model registry", version="1")

    def require_token(request: Request) -> None:
        if token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token):
            raise Unauthorized()

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

    @app.get("/v1/models")
    def list_models() -> dict[str, Any]:
        return {"models": [model_summary(m) for m in reg.list_models()]}

    @app.get("/v1/models/{name}")
    def show_model(name: str) -> dict[str, Any]:
        versions = reg.list_versions(name)
        aliases = reg.aliases(name)
        return {
            "name": name,
            "aliases": aliases,
            "alias_history": {a: reg.alias_history(name, a) for a in aliases},
            "versions": [r.to_dict() for r in versions],
        }

    @app.get("/v1/models/{name}/versions/{ref}")
    def show_version(name: str, ref: str) -> dict[str, Any]:
        """`ref` is a version number, an alias, or ``latest``."""
        rec = reg.resolve(name, ref)
        return {**rec.to_dict(), "aliases": sorted(a for a, v in reg.aliases(name).items() if v == rec.version)}

    @app.post("/v1/models/{name}/aliases/{alias}", dependencies=[Depends(require_token)])
    def set_alias(name: str, alias: str, body: AliasBody) -> dict[str, Any]:
        rec = reg.set_alias(name, alias, body.version)
        return {"model": name, "alias": alias, "version": rec.version}

    @app.post("/v1/models/{name}/aliases/{alias}/rollback", dependencies=[Depends(require_token)])
    def rollback(name: str, alias: str) -> dict[str, Any]:
        rec = reg.rollback(name, alias)
        return {"model": name, "alias": alias, "version": rec.version}

    @app.delete("/v1/models/{name}/versions/{version}", dependencies=[Depends(require_token)])
    def delete_version(name: str, version: int) -> dict[str, Any]:
        reg.delete_version(name, version)
        return {"model": name, "deleted": version}

    @app.get("/healthz")
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
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

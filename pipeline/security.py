"""Which secrets a process needs before it may run, checked once at start (SECURITY.md explains each).

Workers and the inference worker verify every blob and artifact with ``AAS_SIGNING_KEY``; without it
they would accept whatever anyone who can write the object store put there, so they refuse to run
unless ``AAS_INSECURE_DEV`` says "development, unsigned" explicitly. The registry service refuses
writes without a non-empty ``AAS_REGISTRY_TOKEN``.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr

from pipeline.settings import Settings


class InsecureConfig(RuntimeError):
    """A process was started without a secret it needs. The message names the setting and how to fix it."""


def secret_bytes(value: SecretStr | None) -> bytes | None:
    """A secret's bytes, or None when unset, empty or blank (``${VAR:-}`` in compose gives an empty string)."""
    raw = value.get_secret_value() if value is not None else ""
    return raw.encode() if raw.strip() else None


def require_signing_key(settings: Settings, role: str) -> bytes | None:
    """The signing key; InsecureConfig when it is missing and development mode is off."""
    key = secret_bytes(settings.signing_key)
    if key is None and not settings.insecure_dev:
        raise InsecureConfig(
            f"{role} refuses to run without AAS_SIGNING_KEY: it would trust any unsigned checkpoint, gradient or "
            "artifact in the object store. Set AAS_SIGNING_KEY (the same on every worker), or AAS_INSECURE_DEV=1 "
            "on a development machine"
        )
    return key


def registry_token(settings: Settings) -> bytes | None:
    return secret_bytes(settings.registry_token)


def registry_grant(token: bytes, job_id: str, model: str) -> str:
    """Proof, stored with a job, that its submitter held the registry token: HMAC(token, job, model).
    The publishing worker recomputes it with its own token; the token itself is never stored."""
    return hmac.new(token, f"aas-register:{job_id}:{model}".encode(), hashlib.sha256).hexdigest()


def holds_registry_right(settings: Settings, job_id: str, model: str, grant: str | None) -> bool:
    """True when `grant` proves the registry token for (job, model), or in development mode."""
    if settings.insecure_dev:
        return True
    token = registry_token(settings)
    return bool(token and grant) and hmac.compare_digest(registry_grant(token, job_id, model), str(grant))

"""AaS: asynchronous training on Celery fleets, model compression, and online updates."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["Client", "JobSpec", "Settings"]

if TYPE_CHECKING:
    from pipeline.client import Client
    from pipeline.settings import Settings
    from pipeline.spec import JobSpec


def __getattr__(name: str) -> Any:
    # Lazy: `import pipeline` stays cheap (no torch) for the CLI's fast paths.
    if name == "Client":
        from pipeline.client import Client

        return Client
    if name == "JobSpec":
        from pipeline.spec import JobSpec

        return JobSpec
    if name == "Settings":
        from pipeline.settings import Settings

        return Settings
    raise AttributeError(name)

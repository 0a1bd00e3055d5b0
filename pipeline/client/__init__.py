"""The top layer: the Python client, the ``aas`` command line and the demo (layer 4 of DESIGN.md)."""

from __future__ import annotations

from pipeline.client.api import Client, ServiceUnavailable

__all__ = ["Client", "ServiceUnavailable"]

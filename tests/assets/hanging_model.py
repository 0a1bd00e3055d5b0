"""A user model whose factory never returns inside a worker that has AAS_TEST_HANG=1 (tests of hung tasks).

Elsewhere (the submitting process, the aggregator) it builds digits-cnn-small, so a job can be submitted.
"""

from __future__ import annotations

import os
import time
from typing import Any

from torch import nn


def factory(**kwargs: Any) -> nn.Module:
    if os.environ.get("AAS_TEST_HANG") == "1":
        while True:  # user code that sleeps forever
            time.sleep(3600)
    from pipeline.models import build_model

    return build_model("digits-cnn-small", kwargs)

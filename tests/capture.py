"""
The sessions captured from the Go reference (``tests/vectors``, copied from
the project's shared captures).  ``$PILOT_VECTORS`` points elsewhere.
"""

from __future__ import annotations

import json
import os
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))


def vectors_dir() -> str:
    """``$PILOT_VECTORS``, else ``tests/vectors`` (in the repository, so always there)."""
    return os.environ.get("PILOT_VECTORS") or os.path.join(HERE, "vectors")


def vector_path(session: str, name: str) -> str:
    return os.path.join(vectors_dir(), session, name)


def load_vector(session: str, name: str) -> Any:
    with open(vector_path(session, name), "rb") as f:
        return json.loads(f.read().decode("utf-8"))

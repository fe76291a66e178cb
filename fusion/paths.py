"""Where fusemix keeps its files: one home directory (FUSEMIX_HOME) for the lake, caches and run state.

Default: `lake/` beside the project checkout (git-ignored). Set FUSEMIX_HOME to move it.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def fusemix_home() -> Path:
    """The lake directory: $FUSEMIX_HOME, else <project>/lake."""
    env = os.environ.get("FUSEMIX_HOME")
    return Path(env).expanduser().resolve() if env else PROJECT_ROOT / "lake"


def cache_dir(kind: str) -> Path:
    """A cache folder under the home, e.g. cache_dir("models") or cache_dir("data"); created on demand."""
    path = fusemix_home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def configs_dir() -> Path:
    """The user-editable registries (encoders, datasets, experiments)."""
    return Path(os.environ.get("FUSEMIX_CONFIGS", PROJECT_ROOT / "configs"))

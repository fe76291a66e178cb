"""Registry of the image-text default sources: name -> fetcher(cache, *, limit, seed, progress) -> Dataset.

The project merges SOURCES_IMAGE into pipelines.sources.SOURCES.
"""

from __future__ import annotations

from pipelines.sources.emoji import fetch_emoji
from pipelines.sources.icons import fetch_icons
from pipelines.sources.openclipart import fetch_openclipart

SOURCES_IMAGE = {"emoji": fetch_emoji, "icons": fetch_icons, "openclipart": fetch_openclipart}

# The image-text demo: a few hundred emoji in every style, encodable on 2 CPU cores in minutes.
DEMO_IMAGE_SOURCE = "emoji"
DEMO_IMAGE_LIMIT = 300

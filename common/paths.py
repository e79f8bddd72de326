"""Where privtune keeps derived artefacts (converted models, extracted corpora, pretrained demos).

Everything here can be deleted at any time; it is rebuilt on demand. ``PRIVTUNE_CACHE`` overrides
the location (tests point it at a temporary folder shared per session).
"""

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the privtune cache."""
    root = os.environ.get("PRIVTUNE_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "privtune"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path

"""Where things live: the repo's include/ folder and the local results home."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_PKG_ROOT = Path(__file__).resolve().parent.parent


def include_dir() -> Path:
    """Campaigns, cluster profiles and templates (``CHARLLM_INCLUDE`` overrides)."""
    return Path(os.environ.get("CHARLLM_INCLUDE", _PKG_ROOT / "include"))


def campaigns_dir() -> Path:
    return include_dir() / "campaigns"


def home() -> Path:
    """Local results home: catalog, results, tables, figures (``CHARLLM_HOME``)."""
    return Path(os.environ.get("CHARLLM_HOME", _PKG_ROOT / "var")).resolve()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB chunks (hex)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def catalog_url() -> str:
    """SQLAlchemy URL of the results catalog (``CHARLLM_CATALOG_URL``; SQLite by default)."""
    return os.environ.get("CHARLLM_CATALOG_URL") or f"sqlite:///{home() / 'catalog.db'}"


def path_under(root: Path, *parts: str) -> Path:
    """``root/parts...``, proven to stay under ``root`` (resolved, symlinks followed); ConfigError otherwise."""
    from charllm.errors import ConfigError

    base = root.resolve()
    path = base.joinpath(*parts).resolve()
    if not path.is_relative_to(base):
        raise ConfigError(str(root), "/".join(parts), f"the path leaves its folder {base} (resolves to {path})")
    return path

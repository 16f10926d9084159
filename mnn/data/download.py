"""The cache folder, and checksum-verified downloads into it (nothing unverified is kept)."""

from __future__ import annotations

import hashlib
import http.client
import os
import tempfile
import urllib.error
from pathlib import Path
from urllib.request import (
    urlopen,  # module attribute: tests replace it with a fake opener
)

from mnn.errors import DataError

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """mnn's cache folder: ``$MNN_CACHE``, else ``$XDG_CACHE_HOME/mnn``, else ``~/.cache/mnn``."""
    if os.environ.get("MNN_CACHE"):
        return Path(os.environ["MNN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "mnn"
    return Path.home() / ".cache" / "mnn"


def sha256_of(path) -> str:
    """The hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


_NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError)


def _network_reason(error: DataError):
    """Why a :func:`download_verified` failed, when the network (not a checksum, not the disk) failed; else None."""
    cause = error.__cause__
    if not isinstance(cause, _NETWORK_ERRORS):
        return None
    return getattr(cause, "reason", None) or cause


def download_verified(url: str, destination, sha256: str, size: int | None = None) -> Path:
    """Download ``url`` to ``destination``, keeping it only if its sha256 (and size) match.

    The bytes go to a temporary file beside ``destination``, hashed as they
    arrive; the file is renamed into place only after the checksum matches,
    so an interrupted or tampered download never leaves a file that looks
    valid. The folder is created if needed.

    Raises:
        DataError: the network or the server failed, or the checksum or size
            differ; the message names the URL and, for a mismatch, both digests.
    """
    destination = Path(destination)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=f".{destination.name}.", suffix=".part", dir=destination.parent
        )
    except OSError as error:
        raise DataError(f"cannot write into the folder {destination.parent}: {error}") from error
    temporary = Path(temporary)
    try:
        digest, received = hashlib.sha256(), 0
        with os.fdopen(handle, "wb") as out, urlopen(url, timeout=60) as response:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                received += len(chunk)
        if digest.hexdigest() != sha256:
            raise DataError(
                f"download of {url} failed its checksum: sha256 {digest.hexdigest()}, "
                f"expected {sha256} ({received} bytes received); nothing was kept"
            )
        if size is not None and received != size:
            raise DataError(
                f"download of {url}: {received} bytes, expected {size}; nothing was kept"
            )
        os.replace(temporary, destination)
        return destination
    except DataError:
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        reason = getattr(error, "reason", None) or error
        raise DataError(
            f"could not download {url} ({reason}); without network, put the file in "
            f"{destination.parent} by hand or pass the folder that holds it"
        ) from error
    finally:
        temporary.unlink(missing_ok=True)

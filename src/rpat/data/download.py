"""Checked, atomic downloads of dataset archives.

``download_file`` streams a URL (``http://``, ``https://`` or ``file://``) to a
temporary ``.<name>.<random>.part`` file beside ``dest`` (:func:`rpat.utils.atomic_write`),
verifies its checksum and only then renames it to ``dest``, so ``dest`` is either absent or
complete and verified. Every failure a user can meet (no network, HTTP error, truncated
transfer, checksum mismatch, stale corrupt file) is raised as :class:`rpat.errors.InputError`
with a one-line message that says what to do.

Set the environment variable ``RPAT_MIRROR`` to a base URL (for instance
``file:///srv/mirror`` or ``http://127.0.0.1:8000/datasets``) to fetch every
dataset archive from there instead of its official host: the official URL's
directory is replaced by the mirror, the file name is kept (see
:func:`resolve_url`).
"""

from __future__ import annotations

import hashlib
import http.client
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import InputError
from ..utils import atomic_write

__all__ = ["MIRROR_ENV", "download_file", "file_digest", "resolve_url"]

MIRROR_ENV = "RPAT_MIRROR"
_CHUNK = 1 << 20  # bytes per read
_TIMEOUT_S = 60.0  # socket timeout for one read


def resolve_url(url: str) -> str:
    """``url`` with its directory replaced by ``$RPAT_MIRROR`` when that is set.

    ``RPAT_MIRROR=file:///data/mirror`` turns
    ``https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz`` into
    ``file:///data/mirror/cifar-10-python.tar.gz``. Without the variable (or
    when it is empty) the URL is returned unchanged.
    """
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    if not mirror:
        return url
    name = urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
    return f"{mirror.rstrip('/')}/{name}"


def file_digest(path: str | Path, algorithm: str) -> str:
    """Hex digest (``"md5"`` or ``"sha256"``) of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _expected(md5: str | None, sha256: str | None) -> tuple[str, str] | None:
    """(algorithm, lower-case hex digest) to verify against, preferring sha256."""
    if sha256:
        return "sha256", sha256.strip().lower()
    if md5:
        return "md5", md5.strip().lower()
    return None


def _check_existing(dest: Path, check: tuple[str, str] | None) -> bool:
    """True when ``dest`` exists and is good; InputError when it exists and is not."""
    if not dest.exists():
        return False
    if not dest.is_file():
        raise InputError(
            f"{dest} exists but is not a file; move it away and re-run with --download"
        )
    if check is None:
        return True
    algorithm, want = check
    got = file_digest(dest, algorithm)
    if got != want:
        raise InputError(
            f"{dest} exists but its {algorithm} is {got}, expected {want} (a partial or corrupt "
            f"download?); delete it and re-run with --download"
        )
    return True


def download_file(
    url: str,
    dest: str | Path,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its checksum.

    Args:
        url: ``http://``, ``https://`` or ``file://`` URL (used as given; apply
            :func:`resolve_url` first to honour ``RPAT_MIRROR``).
        dest: final path of the file; its parent folders are created.
        md5, sha256: expected hex digest (sha256 wins when both are given). With
            neither, the file is not verified.
        progress: show a tqdm progress bar (bytes) on stderr.

    Returns:
        ``dest`` as a :class:`~pathlib.Path`.

    Behaviour: if ``dest`` already exists with the right checksum (or no
    checksum is given) nothing is downloaded; if it exists with a wrong one an
    InputError tells the user to delete it. Otherwise the data are streamed to a
    temporary ``.part`` file beside ``dest`` (:func:`rpat.utils.atomic_write`),
    checked against the Content-Length (when the server sent one) and the checksum,
    then flushed, fsynced and renamed to ``dest`` with ``os.replace``. On any
    failure the ``.part`` file is removed and an :class:`InputError` naming the
    URL is raised; ``dest`` is never left half-written.
    """
    dest = Path(dest)
    check = _expected(md5, sha256)
    if _check_existing(dest, check):
        return dest
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise InputError(f"cannot download {url!r}: only http(s):// and file:// URLs are supported")

    advice = f"check the connection, or fetch the file by hand and place it at {dest}"
    hasher = hashlib.new(check[0]) if check else None
    try:
        response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        raise InputError(f"cannot download {url}: HTTP {e.code} {e.reason}; {advice}") from None
    except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise InputError(f"cannot download {url}: {reason}; {advice}") from None
    with response:
        length_header = response.headers.get("Content-Length")
        total = int(length_header) if length_header and length_header.isdigit() else None
        received = 0
        # any exception below removes the temporary .part file; success renames it to dest
        with (
            atomic_write(dest, "wb", tmp_suffix=".part") as out,
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                 desc=dest.name, disable=not progress, leave=False) as bar,
        ):
            try:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    if hasher is not None:
                        hasher.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            except (OSError, http.client.HTTPException) as e:
                raise InputError(
                    f"download of {url} was interrupted after {received} bytes ({e!r}); re-run "
                    f"with --download to try again, or {advice}"
                ) from None
            if total is not None and received != total:
                raise InputError(
                    f"download of {url} is truncated: got {received} of {total} bytes; re-run "
                    f"with --download to try again, or {advice}"
                )
            if check is not None and hasher is not None:
                algorithm, want = check
                got = hasher.hexdigest()
                if got != want:
                    raise InputError(
                        f"checksum mismatch for {url}: expected {algorithm} {want}, got {got}; the "
                        f"download is corrupt or the file changed upstream: retry, or fetch a good "
                        f"copy by hand and place it at {dest}"
                    )
    return dest

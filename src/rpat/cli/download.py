"""``rpat download``: fetch and check a dataset archive, or a common-corruption set (fetched, checked, extracted)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..data import CORRUPTION_SETS, DATASETS, download_corruption_set, download_file, resolve_url
from ..errors import InputError
from ..utils import progress_enabled
from .common import HelpFormatter

#: the clean datasets with an official archive, and the corruption sets rpat can verify
CLEAN = [name for name, spec in DATASETS.items() if spec.url and spec.filename]
CORRUPTED = [name for name, s in CORRUPTION_SETS.items() if s.md5]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "download", help="download a dataset archive or a common-corruption set (CIFAR-10-C, CIFAR-100-C)",
        formatter_class=HelpFormatter,
        description="Download a dataset's official archive to ROOT/<archive> and verify its checksum "
        f"({', '.join(CLEAN)}), or a common-corruption set ({', '.join(CORRUPTED)}): its tar is fetched, "
        "verified (MD5), extracted safely into ROOT/CIFAR-10-C (or CIFAR-100-C), checked, and then deleted. "
        "Set RPAT_MIRROR to a base URL (file:// or http://) to fetch from a mirror instead.",
        epilog="examples:\n  rpat download cifar10 --root data\n  rpat download cifar10-c --root data   "
        "# then: rpat eval ... --corruptions data/CIFAR-10-C")
    p.add_argument("name", choices=[*CLEAN, *CORRUPTED], help="what to download")
    p.add_argument("--root", "--data-root", dest="root", default="data", help="folder to download into")
    p.add_argument("--keep-archive", action="store_true",
                   help="corruption sets: keep the .tar after extracting it (it is as large as the folder)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    root = Path(args.root).expanduser()
    progress = progress_enabled(not args.no_progress)
    if args.name in CORRUPTION_SETS:
        folder = download_corruption_set(args.name, root, progress=progress, keep_archive=args.keep_archive)
        print(f"{args.name}: {folder} (checked)")
        return 0
    spec = DATASETS.get(args.name)
    if spec is None or not spec.url or not spec.filename:
        raise InputError(f"nothing to download for {args.name!r}; valid: {', '.join([*CLEAN, *CORRUPTED])}")
    path = download_file(resolve_url(spec.url), root / spec.filename, md5=spec.md5, sha256=spec.sha256,
                         progress=progress)
    print(f"{args.name}: {path} (checked)")
    return 0

"""The extra (generated) training set of ``data.extra``: opened memory-mapped, checked, gathered by rows.

Two layouts are read (:func:`open_extra`):

* **one ``.npz`` file** as the generated-data releases publish it (DeepMind's ``adversarial_robustness``
  and DM-Improves-AT's ``1m.npz``, ``5m.npz``, ...): member ``image``, uint8 ``(N, H, W, C)`` (NHWC, as
  saved by ``np.savez``), and member ``label``, integers ``(N,)``. An *uncompressed* member (``np.savez``,
  ZIP_STORED) is memory-mapped in place: the member's data offset is found from its zip local file header
  and its ``.npy`` header, and ``np.memmap`` maps the bytes behind it. A *compressed* member
  (``np.savez_compressed``) cannot be mapped; it is read whole, with a warning, when its image member is at
  most :data:`MAX_COMPRESSED_BYTES` uncompressed, and refused otherwise with the one-line conversion.
* **a directory of ``.npy`` shards**: pairs ``NAME_image.npy`` (uint8 ``(n_i, H, W, C)``) and
  ``NAME_label.npy`` (integers ``(n_i,)``); the shards are concatenated in the sorted order of ``NAME``
  (e.g. ``shard_0000_image.npy``, ``shard_0001_image.npy``, ...). Each is opened with
  ``np.load(mmap_mode="r")``.

Nothing is read whole: opening reads the headers; the labels are scanned once, in chunks, for their range
(:func:`label_bounds`); a batch reads only its rows (:meth:`ExtraSource.gather`). 20M CIFAR images are
61 GB; their pages enter memory only as batches touch them, and the kernel may drop them again.
"""

from __future__ import annotations

import mmap
import os
import struct
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from .datasets import DatasetSpec

__all__ = [
    "IMAGE_KEY",
    "LABEL_KEY",
    "MAX_COMPRESSED_BYTES",
    "SHARD_IMAGE_SUFFIX",
    "SHARD_LABEL_SUFFIX",
    "ExtraSource",
    "check_extra",
    "check_extra_config",
    "label_bounds",
    "npz_to_shards",
    "open_extra",
]

IMAGE_KEY, LABEL_KEY = "image", "label"  #: the members of a generated-data ``.npz``
SHARD_IMAGE_SUFFIX, SHARD_LABEL_SUFFIX = "_image.npy", "_label.npy"  #: a shard directory's file pairs
#: the largest compressed ``image`` member (uncompressed size) read whole instead of refused: 512 MiB
MAX_COMPRESSED_BYTES = 512 << 20
_CONVERT = ("convert it once, streaming, to a directory of .npy shards: python -c \"from rpat.data.extra import "
            "npz_to_shards; npz_to_shards('IN.npz', 'OUT_DIR')\" and set data.extra=OUT_DIR")


@dataclass
class ExtraSource:
    """An extra training set: ``parts`` of (images uint8 ``(n_i, H, W, C)``, labels int ``(n_i,)``).

    The arrays are memory-mapped (``np.memmap`` / ``np.load(mmap_mode="r")``) except for a small
    compressed ``.npz``, which is held in memory. Global row ``j`` is row ``j - offsets[i]`` of part ``i``.
    """

    path: str
    parts: list[tuple[np.ndarray, np.ndarray]]
    layout: str  #: how it was read, for log lines: "npz, memory-mapped", "3 .npy shards, memory-mapped", ...
    offsets: np.ndarray = field(init=False)  #: first global row of each part, ``(len(parts) + 1,)``
    _maps: list = field(init=False, repr=False)  #: the memory maps (their pages are released after each gather)

    def __post_init__(self) -> None:
        self.offsets = np.cumsum([0] + [len(lab) for _, lab in self.parts]).astype(np.int64)
        maps = (_advise_random(a) for part in self.parts for a in part)
        self._maps = list({id(m): m for m in maps if m is not None}.values())  # an npz's two members: one map each

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(H, W, C)`` of every image."""
        return tuple(int(s) for s in self.parts[0][0].shape[1:])  # type: ignore[return-value]

    def describe(self) -> str:
        h, w, c = self.image_shape
        return f"{len(self):,} images {h}x{w}x{c} from {self.path} ({self.layout})"

    def gather(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` ``(K,)`` (ints in ``[0, N)``, any order, repeats allowed), read from the maps.

        Returns images uint8 ``(K, H, W, C)`` (NHWC, as stored) and labels int64 ``(K,)``, CPU tensors
        in the order of ``idx``; only the pages holding those rows are read.
        """
        idx = np.asarray(idx, dtype=np.int64)
        if len(self.parts) == 1:
            images, labels = self.parts[0]
            x, y = np.ascontiguousarray(images[idx]), np.asarray(labels[idx]).astype(np.int64)
            self._release()
            return torch.from_numpy(x), torch.from_numpy(y)
        h, w, c = self.image_shape
        x = np.empty((len(idx), h, w, c), dtype=np.uint8)
        y = np.empty(len(idx), dtype=np.int64)
        part = np.searchsorted(self.offsets, idx, side="right") - 1
        for i in np.unique(part):
            rows = np.nonzero(part == i)[0]
            local = idx[rows] - self.offsets[i]
            images, labels = self.parts[int(i)]
            x[rows] = images[local]
            y[rows] = labels[local]
        self._release()
        return torch.from_numpy(x), torch.from_numpy(y)

    def _release(self) -> None:
        """Unmap the pages just read, images and labels (``MADV_DONTNEED`` on the read-only shared maps): they
        stay in the page cache, but leave this process's RSS, which so holds at most one batch of extra rows."""
        for m in self._maps:
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (OSError, ValueError):  # advice only
                pass


def _advise_random(a: np.ndarray) -> mmap.mmap | None:
    """``madvise(MADV_RANDOM)`` on the memory map behind ``a`` (returned; None when ``a`` is in memory or the
    platform has no madvise): batches read scattered rows, so the kernel should not read ahead around them
    (without it each row read brought ~64 KiB more into RSS here)."""
    m = getattr(a, "_mmap", None)
    if m is None or not hasattr(m, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        m.madvise(mmap.MADV_RANDOM)
    except (OSError, ValueError):  # advice only
        pass
    return m


# ---- opening ------------------------------------------------------------------------------------------
def open_extra(path: str | os.PathLike) -> ExtraSource:
    """Open ``data.extra``: an ``.npz`` file or a directory of ``NAME_image.npy`` / ``NAME_label.npy`` shards.

    Reads headers only (and, for a small compressed ``.npz``, the file). Checks the members' presence,
    dtypes and shapes; raises :class:`InputError` with one line naming the problem and the fix.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(f"data.extra={str(path)!r} does not exist; give the path of the generated-data .npz "
                         f"(e.g. DM-Improves-AT's 1m.npz) or of a directory of NAME{SHARD_IMAGE_SUFFIX}/"
                         f"NAME{SHARD_LABEL_SUFFIX} shards")
    if p.is_dir():
        source = _open_shards(p)
    else:
        source = _open_npz(p)
    for images, labels in source.parts:
        _check_arrays(images, labels, str(p))
    shapes = {tuple(im.shape[1:]) for im, _ in source.parts}
    if len(shapes) > 1:
        raise InputError(f"data.extra={str(p)!r}: the shards hold images of different sizes {sorted(shapes)}; "
                         "every image must have the same (H, W, C)")
    if len(source) == 0:
        raise InputError(f"data.extra={str(p)!r} holds no images")
    return source


def _open_shards(d: Path) -> ExtraSource:
    names = sorted(f.name[: -len(SHARD_IMAGE_SUFFIX)] for f in d.iterdir() if f.name.endswith(SHARD_IMAGE_SUFFIX))
    if not names:
        raise InputError(f"data.extra={str(d)!r} is a directory without NAME{SHARD_IMAGE_SUFFIX} files; a shard "
                         f"directory holds pairs NAME{SHARD_IMAGE_SUFFIX} (uint8 N x H x W x C) and "
                         f"NAME{SHARD_LABEL_SUFFIX} (N integers)")
    parts = []
    for name in names:
        lab = d / f"{name}{SHARD_LABEL_SUFFIX}"
        if not lab.is_file():
            raise InputError(f"data.extra: shard {name}{SHARD_IMAGE_SUFFIX} has no {lab.name} next to it in {d}")
        parts.append((_load_npy(d / f"{name}{SHARD_IMAGE_SUFFIX}"), _load_npy(lab)))
    return ExtraSource(str(d), parts, f"{len(names)} .npy shard(s), memory-mapped")


def _load_npy(f: Path) -> np.ndarray:
    try:
        return np.load(f, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as e:
        raise InputError(f"data.extra: {f} is not a readable .npy array ({e})") from None


def _open_npz(p: Path) -> ExtraSource:
    try:
        zf = zipfile.ZipFile(p)
    except (zipfile.BadZipFile, OSError):
        raise InputError(f"data.extra={str(p)!r} is not an .npz file (a zip of .npy members) nor a directory of "
                         f"NAME{SHARD_IMAGE_SUFFIX}/NAME{SHARD_LABEL_SUFFIX} shards") from None
    with zf:
        infos = {i.filename[:-4] if i.filename.endswith(".npy") else i.filename: i for i in zf.infolist()}
        missing = [k for k in (IMAGE_KEY, LABEL_KEY) if k not in infos]
        if missing:
            raise InputError(f"data.extra={str(p)!r} has no {' and no '.join(repr(k) for k in missing)} array "
                             f"(it has {sorted(infos)}); a generated-data .npz holds 'image' (uint8 N x H x W x C) "
                             "and 'label' (N integers)")
        img_info, lab_info = infos[IMAGE_KEY], infos[LABEL_KEY]
        compressed = [i for i in (img_info, lab_info) if i.compress_type != zipfile.ZIP_STORED]
        if not compressed:
            return ExtraSource(str(p), [(_map_member(p, img_info), _map_member(p, lab_info))],
                               "npz, memory-mapped")
        if img_info.file_size > MAX_COMPRESSED_BYTES:
            raise InputError(f"data.extra={str(p)!r} is a compressed .npz ({img_info.file_size / 2**30:.1f} GiB "
                             f"of images uncompressed), which cannot be memory-mapped; {_CONVERT}")
        warnings.warn(f"data.extra={str(p)} is a compressed .npz: read whole into memory "
                      f"({img_info.file_size / 2**20:.0f} MiB); for large sets {_CONVERT}", stacklevel=2)
        out = []
        for info in (img_info, lab_info):
            if info.compress_type == zipfile.ZIP_STORED:
                out.append(_map_member(p, info))
            else:
                with zf.open(info) as f:
                    out.append(np.lib.format.read_array(f, allow_pickle=False))
        return ExtraSource(str(p), [(out[0], out[1])], "compressed npz, read whole")


_LOCAL_HEADER = struct.Struct("<4s5H3L2H")  # zip local file header: 30 bytes, then name and extra field


def _map_member(p: Path, info: zipfile.ZipInfo) -> np.ndarray:
    """``np.memmap`` of a stored (uncompressed) ``.npy`` member of the zip ``p``.

    The member's bytes start after its local file header (30 bytes + file name + extra field, whose
    lengths are read from the local header itself, which may differ from the central directory's);
    the ``.npy`` header there gives dtype, shape and order, and the array data follows it.
    """
    with open(p, "rb") as f:
        f.seek(info.header_offset)
        fields = _LOCAL_HEADER.unpack(f.read(_LOCAL_HEADER.size))
        if fields[0] != b"PK\x03\x04":
            raise InputError(f"data.extra={str(p)!r}: member {info.filename} has a damaged zip header")
        member_start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        f.seek(member_start)
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version}")
        except ValueError as e:
            raise InputError(f"data.extra={str(p)!r}: member {info.filename} is not a .npy array ({e})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise InputError(f"data.extra={str(p)!r}: member {info.filename} holds Python objects; save plain arrays")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if offset - member_start + nbytes > info.file_size:
        raise InputError(f"data.extra={str(p)!r}: member {info.filename} is shorter than its header says")
    if nbytes == 0:
        return np.zeros(shape, dtype=dtype)
    return np.memmap(p, dtype=dtype, mode="r", offset=offset, shape=tuple(shape), order="F" if fortran else "C")


def _check_arrays(images: np.ndarray, labels: np.ndarray, where: str) -> None:
    if images.dtype != np.uint8:
        raise InputError(f"data.extra={where!r}: images are {images.dtype}, expected uint8 (pixel values 0..255)")
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        hint = "; it looks like N x C x H x W: transpose to N x H x W x C" if (
            images.ndim == 4 and images.shape[1] in (1, 3)) else ""
        raise InputError(f"data.extra={where!r}: images have shape {tuple(images.shape)}, expected "
                         f"N x H x W x C with C = 1 or 3{hint}")
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise InputError(f"data.extra={where!r}: labels are {labels.dtype} of shape {tuple(labels.shape)}, "
                         "expected N integers")
    if len(labels) != len(images):
        raise InputError(f"data.extra={where!r}: {len(images)} images but {len(labels)} labels")


# ---- checks against the real set -----------------------------------------------------------------------
_BOUNDS: dict[tuple, tuple[int, int]] = {}
_CHUNK = 1 << 22  # labels scanned per read: 4M (32 MiB of int64)


def label_bounds(source: ExtraSource) -> tuple[int, int]:
    """``(min, max)`` of the labels, scanned in chunks (cached per file, size and modification time)."""
    key = (source.path, *[(len(lab), getattr(lab, "filename", None)) for _, lab in source.parts])
    try:
        st = os.stat(source.path)
        key = (*key, st.st_size, st.st_mtime_ns)
    except OSError:
        pass
    if key not in _BOUNDS:
        lo, hi = np.iinfo(np.int64).max, np.iinfo(np.int64).min
        for _, lab in source.parts:
            for s in range(0, len(lab), _CHUNK):
                chunk = np.asarray(lab[s:s + _CHUNK])
                lo, hi = min(lo, int(chunk.min())), max(hi, int(chunk.max()))
            m = getattr(lab, "_mmap", None)
            if m is not None and hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                m.madvise(mmap.MADV_DONTNEED)  # the scanned pages leave RSS (they stay in the page cache)
        _BOUNDS[key] = (lo, hi)
    return _BOUNDS[key]


def check_extra(source: ExtraSource, *, num_classes: int | None, image_size: tuple[int, int] | None,
                in_chans: int | None) -> None:
    """Refuse an extra set that cannot be mixed with the real one: other image size or channels, labels
    outside ``[0, num_classes)``. ``None`` skips a check (an image folder's values are known only once it
    is read). Raises :class:`InputError` with one line."""
    h, w, c = source.image_shape
    if image_size is not None and (h, w) != tuple(image_size):
        raise InputError(f"data.extra: images are {h}x{w} but the training images are "
                         f"{image_size[0]}x{image_size[1]}; the extra set must have the real set's size")
    if in_chans is not None and c != in_chans:
        raise InputError(f"data.extra: images have {c} channel(s) but the training images have {in_chans}")
    if num_classes is not None:
        lo, hi = label_bounds(source)
        if lo < 0 or hi >= num_classes:
            raise InputError(f"data.extra: labels range over [{lo}, {hi}], outside [0, {num_classes}) of the "
                             f"training set's {num_classes} classes")


def _fraction(v: object, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
        raise InputError(f"{name} must be a number in [0, 1), got {v!r}")
    return float(v)


def check_extra_config(path: str | None, fraction: float, smoothing: float, batch_size: int,
                       spec: DatasetSpec) -> None:
    """Config-time checks of ``data.extra*`` (before any training image is read), one InputError line each.

    ``extra_fraction`` and ``extra_label_smoothing`` in [0, 1) (checked even without ``data.extra``, so a
    typo fails early); with ``data.extra``: the path exists, the headers are right (:func:`open_extra`),
    ``round(fraction · batch_size)`` leaves real and extra rows, and, where the dataset's spec knows them,
    the image size, channels and label range match (an image folder's are checked once it is read).
    """
    fraction = _fraction(fraction, "data.extra_fraction")
    _fraction(smoothing, "data.extra_label_smoothing")
    if path is None:
        return
    if not isinstance(path, str) or not path:
        raise InputError(f"data.extra must be a path (an .npz file or a shard directory), got {path!r}")
    k = round(fraction * batch_size) if isinstance(batch_size, int) else 1
    if not 1 <= k < max(int(batch_size), 2):
        raise InputError(f"data.extra_fraction={fraction} of data.batch_size={batch_size} is {k} extra rows per "
                         f"batch; it must give between 1 and {batch_size - 1} (data.extra_fraction=0.7 is the "
                         "published recipes' share)")
    source = open_extra(path)
    size = (spec.image_size, spec.image_size) if spec.image_size else None
    check_extra(source, num_classes=spec.num_classes or None, image_size=size, in_chans=spec.in_chans or None)


def npz_to_shards(path: str | os.PathLike, out_dir: str | os.PathLike, rows_per_shard: int = 1_000_000,
                  prefix: str = "part") -> int:
    """Convert a (compressed or not) generated-data ``.npz`` into a directory of memory-mappable shards.

    Streams the ``image`` member ``rows_per_shard`` rows at a time (memory: one shard, 3 GB for 1M CIFAR
    images at the default), writing ``{prefix}00000_image.npy`` / ``{prefix}00000_label.npy``, ... into
    ``out_dir``, the layout :func:`open_extra` reads (several files into one directory: one ``prefix`` each,
    in the order wanted). Returns the number of images written.
    """
    p, out = Path(path).expanduser(), Path(out_dir).expanduser()
    if int(rows_per_shard) < 1:
        raise InputError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    out.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(p) as zf:
        names = {n[:-4] if n.endswith(".npy") else n: n for n in zf.namelist()}
        missing = [k for k in (IMAGE_KEY, LABEL_KEY) if k not in names]
        if missing:
            raise InputError(f"{str(p)!r} has no {' and no '.join(repr(k) for k in missing)} array")
        with zf.open(names[LABEL_KEY]) as f:
            labels = np.lib.format.read_array(f, allow_pickle=False)
        with zf.open(names[IMAGE_KEY]) as f:
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if fortran or len(shape) != 4 or len(labels) != shape[0]:
                raise InputError(f"{str(p)!r}: image member of shape {shape} (Fortran order: {fortran}) does not "
                                 f"match {len(labels)} labels as N x H x W x C in C order")
            row = int(np.prod(shape[1:])) * dtype.itemsize
            for i, start in enumerate(range(0, shape[0], rows_per_shard)):
                n = min(rows_per_shard, shape[0] - start)
                chunk = np.frombuffer(f.read(n * row), dtype=dtype).reshape((n, *shape[1:]))
                np.save(out / f"{prefix}{i:05d}{SHARD_IMAGE_SUFFIX}", chunk)
                np.save(out / f"{prefix}{i:05d}{SHARD_LABEL_SUFFIX}", labels[start:start + n])
    return int(shape[0])

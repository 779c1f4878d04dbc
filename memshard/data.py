"""Image datasets: prepare any supported source once into one Parquet file, load it back as arrays.

A prepared dataset is a directory holding `images.parquet` with columns `sample_id`, `image`
(fixed_size_binary: each value is one image's C×H×W uint8 bytes, C-order), `label` (nullable
int64), `source` and `content_hash`, plus `memshard.*` schema metadata. Preparing may do per-image
work (decode, resize, convert); loading never does: the image column's buffer is reshaped into one
(N, C, H, W) array.

Image conversions, applied identically to every source:
- palette and alpha images become RGB (the alpha channel is dropped, not composited);
  1-bit, 16-bit and LA images become grayscale; JPEG EXIF orientation is applied.
- grayscale <-> RGB conversion happens only when `channels` is given.
- with a `resolution`, the shorter side is resized (bicubic) and the centre square is cropped.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageOps

from memshard.errors import MemshardError, shown
from memshard.files import checked_path, ensure_writable_dir, in_workspace, replace_directory

DATASET_FILE = "images.parquet"
FORMAT_VERSION = "1"
BUNDLED_SOURCES = ("digits",)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_META = "memshard."
_ROW_GROUP_BYTES = 256 << 20  # bounds the memory of one row group while loading
_NON_IMAGE_COLUMNS = ["sample_id", "label", "source", "content_hash"]
_INT64_MAX = (1 << 63) - 1
# What memshard reads from a Parquet file, by the file's own metadata (decompressed column chunks,
# declared images) or as it decodes (image bytes), may be at most this many times the file's size on
# disk, plus a floor for small files: memory stays a small multiple of the real data. Real images
# compress far less (a prepared digits file decompresses to 0.5x its size, photos to about 1x); a
# 33 KB file that decompresses to 1 GiB of zeros is refused before anything is decompressed.
MAX_EXPANSION = 16
EXPANSION_FLOOR_BYTES = 64 << 20
_PARQUET_BATCH_ROWS = 16  # rows decoded at once from a source file: a batch's memory is 16 values at most


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class ImageDataset:
    sample_ids: np.ndarray  # (N,) str, unique, stable across prepares of the same input
    images: np.ndarray  # (N, C, H, W) uint8, read-only
    labels: np.ndarray  # (N,) int64, -1 where the label is null
    sources: np.ndarray  # (N,) str: file path, "file.parquet#row", "digits#row"
    content_hashes: np.ndarray  # (N,) sha256 hex of each stored C×H×W uint8 image
    label_names: tuple[str, ...]  # names for label ints, may be empty
    fingerprint: str  # sha256 over ids + images
    path: str  # the dataset directory

    @property
    def resolution(self) -> int:
        return int(self.images.shape[2])

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def __len__(self) -> int:
        return len(self.sample_ids)


class _Raw(NamedTuple):
    """One decoded input image before transforms; mode is always "L" or "RGB"."""

    image: Image.Image
    label: int | str | None
    source: str
    sample_id: str | None  # None: derive the id from the content hash


# ---------------------------------------------------------------- validation


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def check_resolution(resolution: int) -> int:
    """The UNet halves the resolution at each level, so it must be a multiple of 8 in [8, 1024]."""
    is_int = isinstance(resolution, (int, np.integer)) and not isinstance(resolution, bool)
    if not is_int or not 8 <= resolution <= 1024 or resolution % 8:
        raise MemshardError(
            f"resolution {resolution} cannot be used: the UNet halves it at each level; "
            f"choose a multiple of 8 between 8 and 1024 such as {_nearest_valid(resolution)}")
    return int(resolution)


def _nearest_valid(resolution: object) -> int:
    if not isinstance(resolution, (int, np.integer)):
        return 32
    return int(min(1024, max(8, round(resolution / 8) * 8)))


def _check_channels(channels: int | None) -> None:
    if channels not in (None, 1, 3):
        raise MemshardError(f"channels {channels} cannot be used: pass --channels 1 (grayscale) "
                            "or 3 (RGB)")


# ---------------------------------------------------------------- readers (one per source kind)


def _decode(data: bytes | Path, source: str) -> Image.Image:
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
    except Exception as exc:  # Pillow raises many types for broken files; all mean "can't decode"
        raise MemshardError(f"cannot read image {source} ({_one_line(exc)}): "
                            "replace or delete the file and prepare again") from None
    return _normalise_mode(img)


def _normalise_mode(img: Image.Image) -> Image.Image:
    if img.mode in ("L", "RGB"):
        return img
    if img.mode.startswith("I;16"):  # 16-bit grayscale: keep the top byte instead of clipping
        return Image.fromarray((np.asarray(img, dtype=np.uint16) >> 8).astype(np.uint8))
    if img.mode in ("1", "I", "F", "LA", "La"):
        return img.convert("L")
    if img.mode in ("P", "PA"):  # via RGBA so palette transparency is handled without a warning
        img = img.convert("RGBA")
    return img.convert("RGB")


def _read_folder(root: Path, files: list[Path]) -> Iterator[_Raw]:
    """Images under `root`; the first-level sub-folder (if any) is the label."""
    for file in files:
        rel = file.relative_to(root).as_posix()
        label = rel.split("/")[0] if "/" in rel else None
        yield _Raw(_decode(file, str(file)), label, str(file), rel)


def _find_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    # Hidden entries are skipped: macOS "._x.png" resource forks are not images.
    found = [p for p in root.rglob("*") if p.suffix.lower() in suffixes and p.is_file()
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_parquet(files: list[Path]) -> tuple[Iterator[_Raw], tuple[str, ...]]:
    """Hugging Face `datasets` layout: an image struct {bytes, path}, optional label and id columns."""
    schemas = [_parquet_schema(f) for f in files]
    image_col = _image_column(schemas[0], files[0])
    label_col = next((c for c in ("label", "labels") if c in schemas[0].names), None)
    id_col = next((c for c in ("id", "sample_id", "image_id") if c in schemas[0].names), None)
    names = _class_label_names(schemas[0], label_col, files[0])
    return _parquet_rows(files, image_col, label_col, id_col), names


def _check_expansion(file: Path, metadata: pq.FileMetaData, columns: list[str], declared: int = 0,
                     fix: str = "") -> int:
    """Refuse `file`, before anything is decompressed, when its `columns` decompress to (by its own
    metadata), or it declares (`declared` image bytes), more than MAX_EXPANSION times its size on disk
    plus EXPANSION_FLOOR_BYTES. Returns that limit."""
    limit = MAX_EXPANSION * file.stat().st_size + EXPANSION_FLOOR_BYTES
    wanted = set(columns)
    decompressed = sum(group.column(j).total_uncompressed_size
                       for group in (metadata.row_group(i) for i in range(metadata.num_row_groups))
                       for j in range(group.num_columns) if group.column(j).path_in_schema.split(".")[0] in wanted)
    if max(decompressed, declared) > limit:
        raise _too_large(file, max(decompressed, declared), fix)
    return limit


def _too_large(file: Path, size: int, fix: str) -> MemshardError:
    return MemshardError(
        f"{file} would take {size / (1 << 20):,.0f} MiB to read but holds {file.stat().st_size:,} bytes: more than "
        f"{MAX_EXPANSION}x its size (plus {EXPANSION_FLOOR_BYTES >> 20} MiB), so it is damaged or not image data; {fix}")


def _parquet_schema(file: Path) -> pa.Schema:
    try:
        return pq.read_schema(file)
    except (pa.ArrowException, OSError, ValueError, MemoryError) as exc:  # ValueError: a damaged name (UTF-8)
        raise MemshardError(f"{file} is not a readable Parquet file ({_one_line(exc)}): "
                            "re-export or re-download it") from None


def _image_column(schema: pa.Schema, file: Path) -> str:
    def is_image(field: pa.Field) -> bool:
        return pa.types.is_struct(field.type) and field.type.get_field_index("bytes") >= 0

    preferred = [schema.field(c) for c in ("image", "img") if c in schema.names]
    for field in preferred + list(schema):
        if is_image(field):
            return field.name
    raise MemshardError(f"{file} has no image column (a struct with a 'bytes' field, as Hugging Face "
                        f"datasets writes); its columns are {schema.names}")


def _class_label_names(schema: pa.Schema, label_col: str | None, file: Path) -> tuple[str, ...]:
    """Label names from the Hugging Face `datasets` schema metadata (a ClassLabel's `names`), if any."""
    def bad(why: str) -> MemshardError:
        return MemshardError(f"{file} has Hugging Face metadata that {why}: re-export the dataset, or "
                             "drop the 'huggingface' schema metadata")

    try:
        hf = json.loads((schema.metadata or {}).get(b"huggingface", b"{}") or "{}")
    except (ValueError, RecursionError) as exc:
        raise bad(f"is not JSON ({_one_line(exc)[:100]})") from None
    if not isinstance(hf, dict):
        raise bad(f"is a JSON {type(hf).__name__}, not an object")
    info = hf.get("info", {})
    features = info.get("features", {}) if isinstance(info, dict) else None
    if not isinstance(features, (dict, list)):
        raise bad("has no 'info.features' object")
    feature = features.get(label_col or "", {}) if isinstance(features, dict) else {}
    names = feature.get("names") if isinstance(feature, dict) else None
    if names is None:
        return ()
    if not isinstance(names, list) or not all(isinstance(n, (str, int)) for n in names):
        raise bad(f"gives the label names as {shown(names)}, not a list of names")
    return tuple(str(n) for n in names)


def _parquet_rows(files, image_col, label_col, id_col) -> Iterator[_Raw]:
    columns = [c for c in (image_col, label_col, id_col) if c]
    for file in files:
        row = 0
        try:
            parquet = pq.ParquetFile(file)
            limit = _check_expansion(file, parquet.metadata, columns, fix="re-export or re-download it")
            decoded = 0
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                images = batch.column(image_col)
                decoded += images.field("bytes").nbytes
                if decoded > limit:  # values repeated from a dictionary page decode to more than its size
                    raise _too_large(file, decoded, "re-export or re-download it")
                data = images.field("bytes").to_pylist()
                has_path = images.type.get_field_index("path") >= 0
                paths = images.field("path").to_pylist() if has_path else [None] * len(batch)
                labels = batch.column(label_col).to_pylist() if label_col else [None] * len(batch)
                ids = batch.column(id_col).to_pylist() if id_col else [None] * len(batch)
                for blob, rel, label, sid in zip(data, paths, labels, ids, strict=True):
                    source = f"{file}#{row}"
                    yield _Raw(_decode(_image_bytes(blob, rel, file, source), source),
                               _parquet_label(label, source), source, _parquet_id(sid, id_col, source))
                    row += 1
        except (pa.ArrowException, OSError, ValueError, MemoryError) as exc:
            raise MemshardError(f"{file} is not a readable Parquet file ({_one_line(exc)}): "
                                "re-export or re-download it") from None


def _image_bytes(blob: bytes | None, rel: str | None, file: Path, source: str) -> bytes | Path:
    if blob is not None:
        return blob
    if rel and (file.parent / rel).is_file():  # HF stores paths relative to the export
        return file.parent / rel
    raise MemshardError(f"row {source} has no image bytes and its path {rel!r} does not exist: "
                        "re-export the dataset with embedded images")


def _parquet_label(label: object, source: str) -> int | str | None:
    if isinstance(label, int) and not isinstance(label, bool):
        return None if label < 0 else _label_in_range(label, source)  # HF uses -1 for "no label"
    if label is None or isinstance(label, str):
        return label
    raise MemshardError(f"row {source} has label {label!r}; labels must be integers or strings "
                        "(drop or rename the label column)")


def _label_in_range(label: int, source: str) -> int:
    if label > _INT64_MAX:
        raise MemshardError(f"{source} has label {shown(label)}, which does not fit a 64-bit signed integer: "
                            "renumber the labels (0, 1, 2, ...)")
    return label


def _parquet_id(sid: object, id_col: str | None, source: str) -> str | None:
    if id_col and sid is None:
        raise MemshardError(f"row {source} has a null {id_col!r}: fill it or drop the id column")
    return None if sid is None else str(sid)


def _read_arrays(file: Path) -> Iterator[_Raw]:
    images, labels = _load_arrays(file)
    images = _arrays_to_uint8(images, file)
    if labels is None:
        labels = np.full(len(images), -1)
    elif labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise MemshardError(f"{file}: labels must be integers of shape ({len(images)},), got "
                            f"{labels.dtype} {labels.shape}: fix the labels array")
    elif labels.size and labels.max() > _INT64_MAX:  # uint64: checked before any image is converted
        row = int(np.argmax(labels > _INT64_MAX))
        _label_in_range(int(labels[row]), f"{file}#{row}")
    for row, (pixels, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        source = f"{file}#{row}"
        yield _Raw(Image.fromarray(pixels), _label_in_range(label, source) if label >= 0 else None, source, None)


def _load_arrays(file: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        loaded = np.load(file, allow_pickle=False)
        if isinstance(loaded, np.ndarray):
            return loaded, None
        with loaded:
            key = next((k for k in ("images", "x", "arr_0") if k in loaded.files), None)
            if key is None:
                raise MemshardError(f"{file} has no 'images', 'x' or 'arr_0' array (it has "
                                    f"{loaded.files}): save the images under one of those names")
            images = loaded[key]
            label_key = next((k for k in ("labels", "y") if k in loaded.files), None)
            labels = loaded[label_key] if label_key else None
    except MemshardError:
        raise
    except MemoryError:  # a header that claims more elements than memory holds
        raise MemshardError(f"{file} declares an array larger than this machine's memory: "
                            "check the file, or prepare the images in parts") from None
    except Exception as exc:  # noqa: BLE001 — numpy raises many types for a broken file (ValueError, OSError,
        # BadZipFile, zlib.error, tokenize.TokenError from a mangled header...); none loads a pickle
        raise MemshardError(f"{file} is not a readable numpy file ({type(exc).__name__}: {_one_line(exc)}): "
                            "save it again with numpy.save / numpy.savez") from None
    return images, labels


def _arrays_to_uint8(images: np.ndarray, file: Path) -> np.ndarray:
    """(N,H,W) or (N,H,W,C) uint8 or float in [0,1] -> (N,H,W) or (N,H,W,3) uint8."""
    if images.ndim == 4 and images.shape[3] == 1:
        images = images[..., 0]
    if not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] == 3)):
        raise MemshardError(f"{file}: images have shape {images.shape}; expected (N, H, W) or "
                            "(N, H, W, C) with C 1 or 3 (transpose channels-first arrays)")
    if np.issubdtype(images.dtype, np.floating):
        if not np.isfinite(images).all():
            raise MemshardError(f"{file}: float images hold NaN or infinite values: replace them "
                                "and save again")
        if images.size and (images.min() < 0 or images.max() > 1):
            raise MemshardError(f"{file}: float images must lie in [0, 1] but range from "
                                f"{images.min()} to {images.max()}: rescale them to [0, 1] "
                                "(e.g. (x + 1) / 2 for [-1, 1]) or save them as uint8")
        return np.rint(images * 255).astype(np.uint8)
    if images.dtype != np.uint8:
        raise MemshardError(f"{file}: images have dtype {images.dtype}; save them as uint8 (0..255) "
                            "or float in [0, 1]")
    return images


def _read_digits() -> Iterator[_Raw]:
    from sklearn.datasets import load_digits  # imported lazily: sklearn is slow to import

    digits = load_digits()
    pixels = np.rint(digits.images * 255 / 16).astype(np.uint8)  # values 0..16 -> 0..255
    for row, (image, label) in enumerate(zip(pixels, digits.target, strict=True)):
        yield _Raw(Image.fromarray(image), int(label), f"digits#{row}", f"digits-{row:05d}")


def _missing_source(source: str) -> MemshardError:
    return MemshardError(f"data source {source!r} does not exist and is not a bundled dataset "
                         f"({', '.join(BUNDLED_SOURCES)}): pass a folder of images, a Parquet "
                         "file or folder, a .npy/.npz file, or 'digits'")


def _open_source(source: str) -> tuple[Iterator[_Raw], tuple[str, ...]]:
    """Pick the reader for `source`; returns the raw samples and any declared label names."""
    if source == "digits":  # the bundled name wins over a path called "digits"; use ./digits
        return _read_digits(), tuple(str(d) for d in range(10))
    path = checked_path(source, "data source").absolute()
    if not path.exists():
        raise _missing_source(source)
    if path.is_dir():
        images, tables = _find_files(path, IMAGE_SUFFIXES), _find_files(path, (".parquet",))
        if images and tables:
            raise MemshardError(f"{path} holds both images ({images[0]}) and Parquet files "
                                f"({tables[0]}): point --data at a folder with only one kind")
        if tables:
            return _read_parquet(tables)
        return _read_folder(path, images), ()
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet([path])
    if suffix in (".npy", ".npz"):
        return _read_arrays(path), ()
    raise MemshardError(f"{path} is not a supported data source: pass a folder of PNG/JPEG images, "
                        "a Parquet file or folder, a .npy/.npz file, or 'digits'")


# ---------------------------------------------------------------- transforms and assembly


def _resize_crop(img: Image.Image, resolution: int) -> Image.Image:
    if img.size == (resolution, resolution):
        return img  # already right: keep the exact pixels
    scale = resolution / min(img.size)
    w, h = max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - resolution) // 2, (h - resolution) // 2
    return img.crop((left, top, left + resolution, top + resolution))


def _to_chw(img: Image.Image) -> np.ndarray:
    pixels = np.asarray(img, dtype=np.uint8)
    pixels = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return np.ascontiguousarray(pixels)


def _check_first(raw: _Raw, resolution: int | None) -> None:
    """Without --resolution the native size is kept, so it must be square and usable."""
    w, h = raw.image.size
    if resolution is None and w != h:
        raise MemshardError(f"{raw.source} is {w}x{h} (not square): pass --resolution N to resize "
                            "the shorter side to N and crop the centre")
    if resolution is None and (w < 8 or w > 1024 or w % 8):
        raise MemshardError(f"{raw.source} is {w}x{h} and {w} cannot be used: the UNet halves it at "
                            f"each level; pass --resolution {_nearest_valid(w)}")


def _canonical_images(raws: Iterable[_Raw], resolution: int | None, channels: int | None):
    """Transform every raw image to C×H×W uint8, enforcing one size and one channel count."""
    first: _Raw | None = None
    for raw in raws:
        img = raw.image
        if first is None:
            first = raw
            _check_first(raw, resolution)
        if channels is None and img.mode != first.image.mode:
            kind = {"L": "grayscale", "RGB": "RGB"}
            raise MemshardError(f"{raw.source} is {kind[img.mode]} but {first.source} is "
                                f"{kind[first.image.mode]}: pass --channels 1 or --channels 3 to convert")
        if resolution is None and img.size != first.image.size:
            raise MemshardError(f"{raw.source} is {img.width}x{img.height} but {first.source} is "
                                f"{first.image.width}x{first.image.height}: pass --resolution N")
        if channels is not None and img.mode != ("L" if channels == 1 else "RGB"):
            img = img.convert("L" if channels == 1 else "RGB")
        if resolution is not None:
            img = _resize_crop(img, resolution)
        yield raw._replace(image=None), _to_chw(img)  # drop the decoded original: it can be large


def _content_ids(hashes: list[str]) -> list[str]:
    """First 16 hex of the content hash; the k-th later repeat of the same content gets "-k"."""
    seen: dict[str, int] = {}
    ids = []
    for h in hashes:
        k = seen.get(h[:16], 0)
        seen[h[:16]] = k + 1
        ids.append(h[:16] if k == 0 else f"{h[:16]}-{k}")
    return ids


def _encode_labels(raw_labels: list, declared: tuple[str, ...]) -> tuple[list, tuple[str, ...]]:
    """String labels (folder names, HF string columns) map to ints by sorted name."""
    strings = sorted({v for v in raw_labels if isinstance(v, str)})
    if not strings:
        return raw_labels, declared
    if any(isinstance(v, int) for v in raw_labels):
        raise MemshardError("labels mix integers and strings: use one type in the label column")
    index = {name: i for i, name in enumerate(strings)}
    return [None if v is None else index[v] for v in raw_labels], tuple(strings)


def fingerprint_of(sample_ids: Iterable[str], images: np.ndarray) -> str:
    h = hashlib.sha256(f"memshard-v{FORMAT_VERSION} {tuple(images.shape)}\n".encode())
    h.update(json.dumps([str(s) for s in sample_ids]).encode())  # JSON: unambiguous separators
    h.update(np.ascontiguousarray(images).data)
    return h.hexdigest()


def content_hash(chw: np.ndarray) -> str:
    """sha256 of one C×H×W uint8 image's bytes: the `content_hash` column of a prepared dataset."""
    return hashlib.sha256(np.ascontiguousarray(chw).data).hexdigest()


def image_file_content_hash(path: Path, image_shape: tuple[int, int, int]) -> str:
    """The content hash an image file has as a sample of a dataset of C×H×W `image_shape` images:
    decoded and converted to C channels the way `prepare_dataset` reads a folder, never resized,
    so the file matches the stored samples it is a pixel-exact copy of."""
    channels, height, width = image_shape
    try:
        img = _decode(path, str(path))
    except MemshardError:
        raise MemshardError(f"cannot read image {path} (not a readable image file): pass a PNG or JPEG file") from None
    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (width, height):
        raise MemshardError(f"image {path} is {img.width}x{img.height} but the training images are "
                            f"{width}x{height}: pass the image as stored in the prepared dataset")
    return content_hash(_to_chw(img))


def _build_table(source: str, resolution: int | None, channels: int | None) -> pa.Table:
    raws, declared_names = _open_source(source)
    rows = list(_canonical_images(raws, resolution, channels))
    if not rows:
        raise MemshardError(f"data source {source} holds no images: add PNG/JPEG files or rows")
    images = np.stack([chw for _, chw in rows])
    hashes = [content_hash(chw) for _, chw in rows]
    given = [raw.sample_id for raw, _ in rows]
    ids = _content_ids(hashes) if given[0] is None else given
    _check_unique(ids, [raw.source for raw, _ in rows])
    labels, names = _encode_labels([raw.label for raw, _ in rows], declared_names)
    c, h, w = images.shape[1:]
    metadata = {"format_version": FORMAT_VERSION, "resolution": str(h), "channels": str(c),
                "count": str(len(ids)), "label_names": json.dumps(list(names)),
                "image_shape": json.dumps([int(c), int(h), int(w)]),  # each image value: C-order bytes
                "fingerprint": fingerprint_of(ids, images)}
    table = pa.table({
        "sample_id": pa.array(ids, pa.string()),
        "image": _image_column_array(images),
        "label": pa.array(labels, pa.int64()),
        "source": pa.array([raw.source for raw, _ in rows], pa.string()),
        "content_hash": pa.array(hashes, pa.string()),
    })
    return table.replace_schema_metadata({(_META + k).encode(): v.encode() for k, v in metadata.items()})


def _image_column_array(images: np.ndarray) -> pa.Array:
    """Each value is one image's C×H×W bytes. fixed_size_binary, not a fixed-shape tensor: Parquet
    stores a list<uint8> value by value with repetition levels and decodes ~50x slower (measured:
    3.5 s vs 0.04 s for 50,000 32x32 RGB images)."""
    n, *shape = images.shape
    width = int(np.prod(shape))
    buffer = pa.py_buffer(np.ascontiguousarray(images))  # zero-copy view of the stacked images
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), n, [None, buffer])


def _check_unique(ids: list[str], sources: list[str]) -> None:
    first_row: dict[str, int] = {}
    for row, sid in enumerate(ids):
        if sid in first_row:
            raise MemshardError(f"sample id {sid!r} appears twice ({sources[first_row[sid]]} and "
                                f"{sources[row]}): make the id column unique or drop it")
        first_row[sid] = row


# ---------------------------------------------------------------- writing and reading


def prepare_dataset(source: str, out_dir: str | Path, resolution: int | None = None,
                    channels: int | None = None) -> Path:
    """Decode `source`, transform every image, and write `out_dir/images.parquet` atomically."""
    if resolution is not None:
        resolution = check_resolution(resolution)
    _check_channels(channels)
    if str(source) not in BUNDLED_SOURCES:
        checked_path(source, "data source")
    out_dir = checked_path(out_dir, "--out").absolute()
    if out_dir.exists() and not _replaceable(out_dir):
        raise MemshardError(f"{out_dir} exists and is not a memshard dataset: choose another output "
                            "directory or remove it yourself")
    # Where it goes is checked before any image is decoded: an unwritable output fails in a second.
    ensure_writable_dir(out_dir.parent, f"the output {out_dir}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        table = _build_table(str(source), resolution, channels)
        rows_per_group = max(1, _ROW_GROUP_BYTES // table.schema.field("image").type.byte_width)
        try:
            pq.write_table(table, tmp / DATASET_FILE, row_group_size=rows_per_group)
            replace_directory(tmp, out_dir)
        except OSError as exc:  # disk full, the folder removed or made read-only while preparing
            raise MemshardError(f"cannot write the dataset to {out_dir} ({exc.strerror or _one_line(exc)}): "
                                "free space or choose another output directory") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _replaceable(out_dir: Path) -> bool:
    """Only an earlier dataset or an empty directory may be replaced: never delete user files."""
    return out_dir.is_dir() and (not any(out_dir.iterdir()) or is_prepared_dataset(out_dir))


def _dataset_file(path: str | Path) -> Path:
    path = checked_path(path, "dataset")
    file = path if path.suffix == ".parquet" and path.is_file() else path / DATASET_FILE
    if not file.is_file():
        raise MemshardError(f"{path} is not a prepared dataset (no {DATASET_FILE}): run "
                            "`memshard data prepare` on your images first")
    return file


def _read_metadata(file: Path, schema: pa.Schema, check: bool = True) -> dict[str, str]:
    """The `memshard.*` metadata; with `check`, every field and the column types are verified, so
    later reads can trust them (a damaged or hand-edited file fails here, in one line)."""
    raw = schema.metadata or {}
    meta = {k.decode(errors="replace")[len(_META):]: v.decode(errors="replace")
            for k, v in raw.items() if k.startswith(_META.encode())}
    if meta.get("format_version") != FORMAT_VERSION:
        raise MemshardError(f"{file} has no memshard metadata (format version "
                            f"{shown(meta.get('format_version'))}): prepare the dataset again")
    if check:
        problem = _metadata_problem(meta, schema)
        if problem:
            raise _corrupt(file, problem)
    return meta


_COLUMN_TYPES = {"sample_id": pa.string(), "label": pa.int64(), "source": pa.string(), "content_hash": pa.string()}


def _metadata_problem(meta: dict[str, str], schema: pa.Schema) -> str | None:
    """What is wrong with a dataset's metadata and schema, or None."""
    numbers = {}
    for name in ("resolution", "channels", "count"):
        if not re.fullmatch(r"[0-9]{1,15}", meta.get(name, "")):
            return f"metadata {name} is {shown(meta.get(name))}, not a count"
        numbers[name] = int(meta[name])
    if numbers["channels"] not in (1, 3) or not 1 <= numbers["resolution"] <= 1024:
        return f"metadata says {numbers['channels']} channels at {numbers['resolution']} px"
    try:
        names = json.loads(meta.get("label_names", ""))
    except (ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return f"metadata label_names is {shown(meta.get('label_names'))}, not a JSON list of names"
    if not re.fullmatch(r"[0-9a-f]{64}", meta.get("fingerprint", "")):
        return f"metadata fingerprint is {shown(meta.get('fingerprint'))}"
    for column, kind in _COLUMN_TYPES.items():
        if schema.get_field_index(column) < 0 or schema.field(column).type != kind:
            return f"column {column} is missing or not {kind}"
    width = numbers["channels"] * numbers["resolution"] ** 2
    image = schema.field("image").type if schema.get_field_index("image") >= 0 else None
    if image is None or _image_width(image) != width:
        return f"the image column does not hold {numbers['channels']}x{numbers['resolution']}x{numbers['resolution']} images"
    return None


def _image_width(kind: pa.DataType) -> int | None:
    """Bytes per image of an image column type (fixed-size binary, or a fixed-shape tensor / list)."""
    if isinstance(kind, pa.BaseExtensionType):
        kind = kind.storage_type
    if pa.types.is_fixed_size_binary(kind):
        return kind.byte_width
    if pa.types.is_fixed_size_list(kind) and kind.value_type == pa.uint8():
        return kind.list_size
    return None


def is_prepared_dataset(path: str | Path) -> bool:
    """True when `path` holds a memshard dataset (it may still turn out damaged when read)."""
    try:
        file = _dataset_file(path)
        _read_metadata(file, _parquet_schema(file), check=False)
        return True
    except MemshardError:
        return False


def _is_intact_dataset(path: str | Path) -> bool:
    try:
        file = _dataset_file(path)
        _read_metadata(file, _parquet_schema(file))
        return True
    except MemshardError:
        return False


def _corrupt(file: Path, exc: Exception) -> MemshardError:
    return MemshardError(f"{file} is not a readable memshard dataset ({_one_line(exc)}): "
                         "prepare the dataset again")


def _read_table(path: str | Path, columns: list[str]) -> tuple[Path, pa.Table, dict]:
    file = _dataset_file(path)
    schema = _parquet_schema(file)
    meta = _read_metadata(file, schema)
    try:
        images = int(meta["count"]) * _image_width(schema.field("image").type)  # checked above
        _check_expansion(file, pq.ParquetFile(file).metadata, [*columns, "image"], images, "prepare the dataset again")
        table = pq.read_table(file, columns=columns)
        table.validate(full=True)  # e.g. a flipped bit that leaves a string column invalid UTF-8
    except (pa.ArrowException, OSError, ValueError, MemoryError) as exc:  # MemoryError: a damaged length field
        raise _corrupt(file, exc) from None
    if table.num_rows != int(meta["count"]):
        raise _corrupt(file, f"{table.num_rows} rows, metadata says {meta['count']}")
    return file, table, meta


def _read_images(file: Path, shape: tuple[int, int, int, int]) -> np.ndarray:
    """Copy each row group's flat image bytes into one preallocated array: no per-row work, and
    peak memory is the array plus one row group."""
    images = np.empty(shape, np.uint8)
    flat, start = images.reshape(-1), 0
    try:
        parquet = pq.ParquetFile(file)
        for group in range(parquet.num_row_groups):
            for chunk in parquet.read_row_group(group, columns=["image"]).column(0).chunks:
                values = _chunk_bytes(chunk)
                flat[start:start + values.size] = values
                start += values.size
    except (pa.ArrowException, OSError, ValueError, MemoryError) as exc:  # ValueError: sizes do not fit
        raise _corrupt(file, exc) from None
    if start != flat.size:
        raise _corrupt(file, f"{start} image bytes, expected {flat.size}")
    images.flags.writeable = False  # the dataset is immutable: its fingerprint covers these bytes
    return images


def _chunk_bytes(chunk: pa.Array) -> np.ndarray:
    """The chunk's images as flat uint8; also reads fixed-shape-tensor / fixed-size-list columns."""
    if isinstance(chunk, pa.ExtensionArray):
        chunk = chunk.storage
    if pa.types.is_fixed_size_binary(chunk.type):
        width = chunk.type.byte_width
        return np.frombuffer(chunk.buffers()[1], np.uint8, len(chunk) * width, chunk.offset * width)
    return chunk.flatten().to_numpy(zero_copy_only=False).astype(np.uint8, copy=False)


def load_dataset(path: str | Path) -> ImageDataset:
    """The whole dataset in memory; `images` is one read-only (N, C, H, W) uint8 array."""
    file, table, meta = _read_table(path, _NON_IMAGE_COLUMNS)
    res = int(meta["resolution"])
    sample_ids = table.column("sample_id").to_numpy(zero_copy_only=False)
    images = _read_images(file, (table.num_rows, int(meta["channels"]), res, res))
    if fingerprint_of(sample_ids, images) != meta["fingerprint"]:  # one pass of sha256: what trains is what was prepared
        raise _corrupt(file, "its images or ids differ from the fingerprint it was prepared with")
    return ImageDataset(
        sample_ids=sample_ids,
        images=images,
        labels=table.column("label").fill_null(-1).to_numpy().astype(np.int64),
        sources=table.column("source").to_numpy(zero_copy_only=False),
        content_hashes=table.column("content_hash").to_numpy(zero_copy_only=False),
        label_names=tuple(json.loads(meta["label_names"])),
        fingerprint=meta["fingerprint"],
        path=str(file.parent),
    )


# ---------------------------------------------------------------- inspection and caching


def inspect_dataset(path: str | Path) -> dict:
    """Counts, label histogram and exact-duplicate groups, read without touching the images."""
    file, table, meta = _read_table(path, ["sample_id", "label", "content_hash"])
    ids = table.column("sample_id").to_numpy(zero_copy_only=False)
    labels = table.column("label").fill_null(-1).to_numpy()
    names = json.loads(meta["label_names"])
    values, counts = np.unique(labels[labels >= 0], return_counts=True)
    histogram = {(names[v] if v < len(names) else str(v)): int(n) for v, n in zip(values, counts, strict=True)}
    _, inverse, sizes = np.unique(table.column("content_hash").to_numpy(zero_copy_only=False),
                                  return_inverse=True, return_counts=True)
    by_hash: dict[int, list[str]] = {}  # insertion order = first appearance in the dataset
    for row in np.flatnonzero(sizes[inverse] > 1):  # Python work only on duplicated rows
        by_hash.setdefault(int(inverse[row]), []).append(str(ids[row]))
    groups = sorted(by_hash.values(), key=len, reverse=True)  # stable sort keeps first-seen order
    res, ch = int(meta["resolution"]), int(meta["channels"])
    return {"path": str(file.parent), "count": table.num_rows, "shape": [ch, res, res],
            "label_histogram": histogram, "unlabeled": int((labels < 0).sum()),
            "duplicate_groups": groups, "fingerprint": meta["fingerprint"]}


def _source_signature(source: str) -> list:
    """What identifies the source's content cheaply: path plus size/mtime of every file."""
    if source in BUNDLED_SOURCES:
        return [source]
    path = Path(source).absolute()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stats = [(p.relative_to(path).as_posix() if path.is_dir() else "", p.stat().st_size,
              p.stat().st_mtime_ns) for p in files if p.exists()]
    return [str(path), stats]


def resolve_dataset(data: str, resolution: int | None, channels: int | None,
                    cache_dir: str | Path) -> Path:
    """A prepared dataset dir as is, or prepare `data` into the cache once and reuse it. Both are settings:
    relative paths lie under the workspace root."""
    data = str(data)
    if data not in BUNDLED_SOURCES:
        data = str(in_workspace(checked_path(data, "data.path")))
    if data not in BUNDLED_SOURCES and is_prepared_dataset(data):
        meta = _read_metadata(_dataset_file(data), _parquet_schema(_dataset_file(data)))
        for name, wanted in (("resolution", resolution), ("channels", channels)):
            if wanted is not None and int(meta[name]) != wanted:
                raise MemshardError(f"{data} was prepared with {name} {meta[name]}, not {wanted}: "
                                    f"drop --{name} or prepare the original images with --{name} {wanted}")
        return _dataset_file(data).parent.absolute()
    if resolution is not None:
        resolution = check_resolution(resolution)
    _check_channels(channels)
    if data not in BUNDLED_SOURCES and not Path(data).exists():
        raise _missing_source(data)
    key = json.dumps([FORMAT_VERSION, _source_signature(data), resolution, channels])
    cache_dir = in_workspace(cache_dir)
    target = cache_dir / hashlib.sha256(key.encode()).hexdigest()[:16]
    if _is_intact_dataset(target):
        return target
    ensure_writable_dir(cache_dir, "data.cache_dir")
    return prepare_dataset(data, target, resolution, channels)

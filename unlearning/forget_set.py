"""The forget set: a SPEC string → sorted global row indices of the training dataset.

SPEC is one of
- comma-separated sample ids:            `digits-00012,digits-00013`
- a text file of ids (one per line or comma-separated, `#` starts a comment)
- image files or a folder of images (the suffixes `memshard.data` reads), matched to the dataset by
  content hash (`memshard.data.image_file_content_hash`: every sample whose stored bytes equal the
  image's is forgotten, so all exact duplicates go together); ids and image paths may be mixed in
  one comma-separated list
- `evaluation:RUN_ID[:MEASURE]`: the training samples an evaluation run found generations to be
  copies of, by MEASURE: `near-copies` (the default: calibrated on real images, what `memshard tune`
  minimizes) or `r-copies` (r < the run's r-copy threshold; on a small set of similar images it also
  takes ordinary near neighbours). Resolved by the caller, which passes `evaluation_ids(run_id,
  measure)`; this module reads no tracking store. Every exact duplicate comes along: an evaluation
  credits a generation to one row of a group of identical images, and forgetting one row while its
  duplicates stay in the keep set would teach the image straight back.

Pure except for reading the named files. Every problem is a one-line MemshardError.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memshard.data import IMAGE_SUFFIXES, image_file_content_hash
from memshard.errors import MemshardError
from memshard.evaluation.evaluate import PER_SAMPLE_MEASURES

EVALUATION_PREFIX = "evaluation:"
# What `evaluation:RUN_ID` forgets: near copies, the measure calibrated on real images (see the module notes).
DEFAULT_EVALUATION_MEASURE = "near-copies"


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy fields with == is ambiguous
class ForgetSet:
    """A forget set A within training data X: its rows, the rows of X \\ A, and A's sample ids."""

    rows: np.ndarray  # sorted global rows of A
    keep_rows: np.ndarray  # sorted global rows of X minus A
    ids: tuple[str, ...]
    measure: str | None = None  # the evaluation measure that chose it (PER_SAMPLE_MEASURES); None: named by hand

    @property
    def hash(self) -> str:
        """Names the forget set in tags, whatever order its ids were given in."""
        return hashlib.sha256("\n".join(sorted(self.ids)).encode()).hexdigest()


def forget_set(spec: str, sample_ids: np.ndarray, content_hashes: np.ndarray, image_shape: tuple[int, int, int],
               evaluation_ids: Callable[[str, str], list[str]] | None = None) -> ForgetSet:
    """The ForgetSet that `spec` names (see `parse_forget_spec`)."""
    rows = parse_forget_spec(spec, sample_ids, content_hashes, image_shape, evaluation_ids)
    keep = np.setdiff1d(np.arange(len(sample_ids)), rows)
    evaluation = evaluation_spec(spec)
    return ForgetSet(rows, keep, tuple(str(i) for i in np.asarray(sample_ids)[rows]),
                     evaluation[1] if evaluation else None)


def evaluation_spec(spec: str) -> tuple[str, str] | None:
    """(run id, measure) of an `evaluation:RUN_ID[:MEASURE]` spec; None for any other spec."""
    spec = (spec or "").strip()
    if not spec.startswith(EVALUATION_PREFIX):
        return None
    run_id, _, measure = spec[len(EVALUATION_PREFIX):].partition(":")
    run_id, measure = run_id.strip(), measure.strip() or DEFAULT_EVALUATION_MEASURE
    if not run_id:
        raise MemshardError(f"--forget {spec!r} names no evaluation run: write evaluation:RUN_ID")
    if measure not in PER_SAMPLE_MEASURES:
        raise MemshardError(f"--forget {spec!r}: unknown measure {measure!r}; write evaluation:RUN_ID "
                            f"(near copies) or evaluation:RUN_ID:MEASURE with MEASURE one of {', '.join(PER_SAMPLE_MEASURES)}")
    return run_id, measure


def parse_forget_spec(
    spec: str,
    sample_ids: np.ndarray,
    content_hashes: np.ndarray,
    image_shape: tuple[int, int, int],
    evaluation_ids: Callable[[str, str], list[str]] | None = None,
) -> np.ndarray:
    """Sorted unique row indices named by `spec`; refuses an empty set and the whole dataset."""
    spec = (spec or "").strip()
    if not spec:
        raise MemshardError("the forget set is empty: pass --forget with sample ids, a file of ids, images, "
                            "or evaluation:RUN_ID")
    id_to_row = {str(sid): row for row, sid in enumerate(sample_ids)}
    rows: set[int] = set()
    evaluation = evaluation_spec(spec)
    if evaluation is not None:
        run_id, measure = evaluation
        if evaluation_ids is None:
            raise MemshardError(f"--forget {spec!r}: evaluation runs are not readable here: pass sample ids")
        ids = [str(i) for i in evaluation_ids(run_id, measure)]
        if not ids:
            raise MemshardError(f"evaluation run {run_id} found no {measure} of training samples, so the forget set "
                                "is empty: nothing to unlearn (another measure: evaluation:RUN_ID:MEASURE; or pick "
                                "ids yourself with --forget ID,...)")
        rows |= _rows_of_ids(ids, id_to_row, f"evaluation run {run_id}")
        rows |= _same_pixels(rows, content_hashes)
    else:
        ids, images = _split_tokens(spec)
        if ids:
            rows |= _rows_of_ids(ids, id_to_row, "--forget")
        if images:
            rows |= _rows_of_images(images, content_hashes, image_shape)
    if not rows:
        raise MemshardError(f"--forget {spec!r} names no samples: pass at least one sample id or image")
    if len(rows) == len(sample_ids):
        raise MemshardError(f"the forget set holds all {len(sample_ids)} training samples: nothing would be left to "
                            "keep; forget a subset, or train a new model instead")
    return np.array(sorted(rows), dtype=np.int64)


def _split_tokens(spec: str) -> tuple[list[str], list[Path]]:
    """Ids and image paths from a comma list, a file of ids, an image, or a folder of images."""
    path = Path(spec)
    if "," not in spec and path.is_dir():
        images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise MemshardError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}): put the images to "
                                "forget there, or pass sample ids")
        return [], images
    if "," not in spec and path.is_file() and path.suffix.lower() not in IMAGE_SUFFIXES:
        return _read_id_file(path), []
    ids, images = [], []
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        candidate = Path(token)
        if candidate.suffix.lower() in IMAGE_SUFFIXES and candidate.is_file():
            images.append(candidate)
        elif candidate.suffix.lower() in IMAGE_SUFFIXES and ("/" in token or "\\" in token):
            raise MemshardError(f"image {token} does not exist: check the path")
        else:
            ids.append(token)
    return ids, images


def _read_id_file(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise MemshardError(f"cannot read the id file {path} ({type(error).__name__}): pass a text file with one "
                            "sample id per line") from None
    ids = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        ids += [token.strip() for token in line.split(",") if token.strip()]
    if not ids:
        raise MemshardError(f"the id file {path} lists no sample ids, so the forget set is empty: add ids, one per line")
    return ids


def _rows_of_ids(ids: list[str], id_to_row: dict[str, int], origin: str) -> set[int]:
    unknown = [i for i in dict.fromkeys(ids) if i not in id_to_row]
    if unknown:
        shown = ", ".join(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise MemshardError(f"{len(unknown)} sample id(s) from {origin} are not in the model's training data "
                            f"({shown}): use ids of the dataset the model was trained on (memshard data inspect)")
    return {id_to_row[i] for i in ids}


def _same_pixels(rows: set[int], content_hashes: np.ndarray) -> set[int]:
    """Every row whose stored image equals that of one of `rows` (content hash)."""
    hashes = np.asarray(content_hashes).astype(str)
    return {int(r) for r in np.flatnonzero(np.isin(hashes, hashes[sorted(rows)]))}


def _rows_of_images(images: list[Path], content_hashes: np.ndarray, image_shape: tuple[int, int, int]) -> set[int]:
    hashes = np.asarray(content_hashes).astype(str)
    rows: set[int] = set()
    for path in images:
        matches = np.flatnonzero(hashes == image_file_content_hash(path, image_shape))
        if len(matches) == 0:
            raise MemshardError(f"image {path} matches no training sample (no image with the same pixels): pass the "
                                "exact image as stored in the dataset, or its sample id")
        rows |= {int(m) for m in matches}
    return rows

"""The k nearest training images of every generated image: a chunked matrix product on the device.

Squared L2 distances are expanded as ‖g‖² + ‖x‖² − 2·g·x, so one block of distances is one matrix
product (float32, autocast off). Both sides are chunked: the references (training images) live on
the device once, the queries (generations) go there one chunk at a time, and one distance block is
at most `block_bytes`; a query chunk's running top-k is merged with each reference chunk's top-k.
Nothing of size queries × references is ever held, so 65,536 generations × 50,000 CIFAR-10 images
× 3,072 values need about 4 GB of GPU memory at the default 1 GiB block.

The expansion loses digits when two images are close (for an exact copy it may give 1e-4 instead of
0, or a slightly negative number), so the k candidates it selects are re-measured exactly as
Σ(g − x)² and re-sorted: the distances returned are direct float32 sums of squares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from memshard.errors import MemshardError
from memshard.model import resolve_device

FLOAT_BYTES = 4
DEFAULT_BLOCK_BYTES = {"cuda": 1 << 30, "cpu": 1 << 28}


@dataclass(frozen=True)
class Neighbors:
    sq_distances: np.ndarray  # (M, k) float32, ascending along each row
    indices: np.ndarray  # (M, k) int64 rows of the reference set


def _as_rows(values, label: str) -> torch.Tensor:
    """(N, ...) array or tensor -> (N, D) tensor, on the host as given (no copy when possible)."""
    if isinstance(values, np.ndarray):  # torch warns on read-only arrays (a loaded dataset is one)
        values = np.ascontiguousarray(values) if values.flags.writeable else values.copy()
    tensor = torch.as_tensor(values)
    if tensor.ndim < 2 or tensor.shape[0] == 0:
        raise MemshardError(f"the {label} must be a non-empty (N, ...) array of images, got shape {tuple(tensor.shape)}")
    return tensor.reshape(tensor.shape[0], -1)


def plan_chunks(num_queries: int, num_references: int, dims: int, k: int, block_bytes: int) -> tuple[int, int, int]:
    """(query rows, reference rows, refine rows) per chunk so that one block fits `block_bytes`."""
    elements = max(1, block_bytes // FLOAT_BYTES)
    query_rows = min(num_queries, max(1, math.isqrt(elements) // 2))
    reference_rows = min(num_references, max(k, elements // query_rows))
    refine_rows = min(query_rows, max(1, elements // (k * dims)))  # the (rows, k, D) gathered block
    return query_rows, reference_rows, refine_rows


def nearest_neighbors(
    queries,
    references,
    k: int,
    *,
    scale: float = 1.0,
    device: str | torch.device | None = None,
    block_bytes: int | None = None,
    query_rows: int | None = None,
    reference_rows: int | None = None,
) -> Neighbors:
    """The k smallest squared L2 distances from each query row to the reference rows, and their rows.

    `queries` (M, ...) and `references` (N, ...) are arrays or tensors of any numeric dtype (uint8
    images stay uint8 on the host and are converted a chunk at a time); distances are between the
    values times `scale` (1/255 puts uint8 pixels in [0, 1]). Chunk sizes follow `block_bytes`
    unless given; they change the work split, never the answer.
    """
    g, x = _as_rows(queries, "generated images"), _as_rows(references, "training images")
    if g.shape[1] != x.shape[1]:
        raise MemshardError(
            f"generated images have {g.shape[1]} values each but training images have {x.shape[1]}: "
            "evaluate against the dataset the model was trained on (same resolution and channels)"
        )
    if not 1 <= k <= x.shape[0]:
        raise MemshardError(f"k = {k} nearest neighbours need 1 <= k <= {x.shape[0]} (the number of training images)")
    device = resolve_device(device)
    block = block_bytes or DEFAULT_BLOCK_BYTES.get(device.type, DEFAULT_BLOCK_BYTES["cpu"])
    planned = plan_chunks(g.shape[0], x.shape[0], g.shape[1], k, block)
    q_rows, r_rows = query_rows or planned[0], reference_rows or planned[1]
    refine_rows = min(q_rows, planned[2])

    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        refs = x.to(device=device, dtype=torch.float32)
        refs = refs * scale if scale != 1.0 else refs  # no copy of references already in [0, 1] on the device
        ref_norms = refs.square().sum(dim=1)
        out_d = np.empty((g.shape[0], k), dtype=np.float32)
        out_i = np.empty((g.shape[0], k), dtype=np.int64)
        for start in range(0, g.shape[0], q_rows):
            q = g[start:start + q_rows].to(device=device, dtype=torch.float32) * scale
            candidates = _scan(q, refs, ref_norms, k, r_rows)
            sq, idx = _refine(q, refs, candidates, refine_rows)
            out_d[start:start + len(q)] = sq.cpu().numpy()
            out_i[start:start + len(q)] = idx.cpu().numpy()
    return Neighbors(out_d, out_i)


def _scan(q: torch.Tensor, refs: torch.Tensor, ref_norms: torch.Tensor, k: int, r_rows: int) -> torch.Tensor:
    """Rows of the k nearest references of every query in `q`, by the expanded distance."""
    q_norms = q.square().sum(dim=1, keepdim=True)
    best_d = torch.full((len(q), 0), math.inf, device=q.device)
    best_i = torch.empty((len(q), 0), dtype=torch.long, device=q.device)
    for r0 in range(0, len(refs), r_rows):
        block = q @ refs[r0:r0 + r_rows].T  # the one (queries x references) allocation per step
        block.mul_(-2.0).add_(q_norms).add_(ref_norms[r0:r0 + r_rows])
        d, i = block.topk(min(k, block.shape[1]), dim=1, largest=False)
        merged_d, merged_i = torch.cat([best_d, d], dim=1), torch.cat([best_i, i + r0], dim=1)
        best_d, pos = merged_d.topk(min(k, merged_d.shape[1]), dim=1, largest=False)
        best_i = merged_i.gather(1, pos)
    return best_i


def _refine(q: torch.Tensor, refs: torch.Tensor, candidates: torch.Tensor, rows: int):
    """Exact Σ(g − x)² for the candidate pairs, sorted ascending (ties keep the lower row first)."""
    sq = torch.empty(candidates.shape, dtype=torch.float32, device=q.device)
    for s in range(0, len(q), rows):
        diff = refs[candidates[s:s + rows]] - q[s:s + rows, None, :]
        sq[s:s + rows] = diff.square_().sum(dim=2)
    order = torch.argsort(candidates, dim=1)  # stable sort by distance after sorting by row: ties -> lower row
    sq, candidates = sq.gather(1, order), candidates.gather(1, order)
    sq, pos = torch.sort(sq, dim=1, stable=True)
    return sq, candidates.gather(1, pos)

"""Sample chunks: the scatter (which samples a chunk holds) and the gathers of chunk tables and KV datasets.

Chunk c holds the samples with sample_idx in [c x size, (c+1) x size) of the sample table (`run.chunk_size`).
Sampling is prefix-stable (kvpipe.data.sampling.sample), so a chunk's rows do not depend on `sampling.n` once
it is full: raising n adds chunks and changes only the last, partial one. A chunk is a range of samples, not of
passages: a later sample may return to an earlier passage, so a chunk of whole passages would change when n
grows. Nothing a chunk computes needs its passage's other questions (each sample is answered alone); the splits
and bootstrap by passage are made from the whole table by the fits and the gathers.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from kvpipe.errors import KvpipeError
from kvpipe.io import read_json, sha256_file, write_json, write_parquet
from kvpipe.kv import store as kvstore


def chunk_name(chunk: int) -> str:
    """The chunk's wildcard value and directory name: its index, four digits."""
    return f"{chunk:04d}"


def chunk_names(n: int, size: int) -> list[str]:
    """The chunks of n samples, in sample order."""
    return [chunk_name(c) for c in range((n + size - 1) // size)]


def chunk_range(chunk: str | int, n: int, size: int) -> tuple[int, int]:
    """[first, end) sample_idx of a chunk of n samples."""
    first = int(chunk) * size
    if not 0 <= first < n:
        raise KvpipeError(f"chunk {chunk}: no samples (sampling.n={n}, run.chunk_size={size})")
    return first, min(first + size, n)


def concat_tables(paths: Sequence[Path | str], out: Path | str) -> pd.DataFrame:
    """The chunks' tables, one after the other, written to out: the table one job would write. Empty ones add no
    rows (nor their column types); where all are empty, the first is the table."""
    frames = [pd.read_parquet(path) for path in paths]
    rows = [frame for frame in frames if len(frame)]
    table = pd.concat(rows, ignore_index=True) if rows else frames[0]
    write_parquet(table, Path(out))
    return table


def _link(source: Path, target: Path) -> None:
    """target as a hard link to source (a copy where the file system has none), replacing what was there."""
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _same(manifests: list[dict[str, Any]], field: str) -> Any:
    values = [m[field] for m in manifests]
    if any(v != values[0] for v in values):
        raise KvpipeError(f"KV chunks: their manifests differ in {field!r}; rerun extraction (extract_kv_chunk)")
    return values[0]


def gather_kv(chunk_roots: Sequence[Path | str], samples: Path | str, root: Path | str) -> dict[str, Any]:
    """One KV dataset under root from the chunks' datasets, as one extraction of the whole sample table writes it.

    Each chunk's shard files are linked into root under their global shard index (first sample_idx // shard_size;
    chunks hold whole shards); the manifest lists them with their digests, its key names the whole table.
    """
    root = Path(root)
    manifests = [kvstore.load_manifest(Path(r)) for r in chunk_roots]
    if not manifests:
        raise KvpipeError(f"{root}: no KV chunks to gather")
    for field in manifests[0]["key"].keys() - {"samples_sha256"}:
        _same([m["key"] for m in manifests], field)
    size = _same([m["key"]["extraction"] for m in manifests], "shard_size")
    n_samples = sum(m["n_samples"] for m in manifests)
    if n_samples != pq.read_metadata(samples).num_rows:
        raise KvpipeError(f"{samples}: {pq.read_metadata(samples).num_rows} samples, but the KV chunks hold {n_samples}")
    shards = []
    for chunk_root, manifest in zip(map(Path, chunk_roots), manifests, strict=True):
        for shard in manifest["shards"]:
            index, rest = divmod(shard["samples"][0], size)
            if rest:
                raise KvpipeError(
                    f"{chunk_root}: shard {shard['index']} starts inside a shard; run.chunk_size must "
                    "be a multiple of extraction.shard_size"
                )
            files = {}
            for rel, digest in shard["files"].items():
                target = kvstore.shard_file(int(rel.split("/")[0].removeprefix("layer=")), index)
                _link(chunk_root / rel, root / target)
                files[target] = digest
            shards.append(shard | {"index": index, "files": files})
    kvstore.remove_stale(root, {rel for shard in shards for rel in shard["files"]})
    manifest = manifests[0] | {
        "key": manifests[0]["key"] | {"samples_sha256": sha256_file(Path(samples))},
        "n_samples": n_samples,
        "rows_per_layer": sum(m["rows_per_layer"] for m in manifests),
        "bytes": sum(m["bytes"] for m in manifests),
        "shards": sorted(shards, key=lambda s: s["index"]),
    }
    seconds = [
        read_json(Path(r) / kvstore.TIMINGS)["seconds_this_run"] for r in chunk_roots if (Path(r) / kvstore.TIMINGS).exists()
    ]
    write_json(root / kvstore.TIMINGS, {"seconds_this_run": round(sum(seconds), 3)})
    kvstore.finish(root, manifest)
    return manifest

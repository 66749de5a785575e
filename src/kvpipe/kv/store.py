"""The on-disk KV dataset: hive-partitioned by layer, sharded by sample range, with a manifest.

Layout of results/kv/{dataset}/{model}/:

    layer=00/shard-00000.parquet   rows of samples [0, shard_size) at layer 0
    layer=00/shard-00001.parquet   ...
    manifest.partial.json          progress: shards written so far (rewritten atomically)
    manifest.json                  written last; its presence means the dataset is complete

One row per (sample, token) in each layer file. Columns: sample_idx, sample_id, position,
segment (template/context/question), token_id, char_start, char_end (character offsets into
the context, then the question numbered from len(context); -1 for template tokens: the axis
kvpipe.alignment pairs tokenizers on), key (post-RoPE, as cached), key_pre_rope, value; the last three
are fixed-size lists of num_kv_heads * head_dim floats, head-major.
Every read checks the file's SHA-256 against manifest.json (read_shard).
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kvpipe.data.prompt import SEGMENT_NAMES
from kvpipe.errors import KvpipeError
from kvpipe.io import atomic_path, read_json, sha256_file, write_json

FORMAT = "kvpipe-kv/1"
KINDS = ("key", "key_pre_rope", "value")
MANIFEST, PARTIAL = "manifest.json", "manifest.partial.json"
TIMINGS = "timings.json"   # seconds the last extraction run took (apart: the manifest is byte-identical between runs)
_HASHER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpipe-sha256")  # hashes while pyarrow decodes


def shard_file(layer: int, shard: int) -> str:
    """Relative path of one (layer, shard) file."""
    return f"layer={layer:02d}/shard-{shard:05d}.parquet"


def schema(width: int, storage: str) -> pa.Schema:
    """Arrow schema of a layer file; width = num_kv_heads * head_dim."""
    vec = pa.list_(pa.float16() if storage == "float16" else pa.float32(), width)
    return pa.schema([
        ("sample_idx", pa.int32()), ("sample_id", pa.string()), ("position", pa.int32()),
        ("segment", pa.dictionary(pa.int8(), pa.string())), ("token_id", pa.int32()),
        ("char_start", pa.int32()), ("char_end", pa.int32()),
        ("key", vec), ("key_pre_rope", vec), ("value", vec),
    ])


def build_table(meta: dict[str, np.ndarray], vectors: dict[str, np.ndarray], sch: pa.Schema) -> pa.Table:
    """Assemble a layer table from per-token metadata and [rows, width] matrices per kind."""
    segment = pa.DictionaryArray.from_arrays(pa.array(meta["segment"], pa.int8()), pa.array(SEGMENT_NAMES))
    columns = [pa.array(meta["sample_idx"], pa.int32()), pa.array(meta["sample_id"], pa.string()),
               pa.array(meta["position"], pa.int32()), segment, pa.array(meta["token_id"], pa.int32()),
               pa.array(meta["char_start"], pa.int32()), pa.array(meta["char_end"], pa.int32())]
    for kind in KINDS:
        mat = vectors[kind]
        columns.append(pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1]))
    return pa.Table.from_arrays(columns, schema=sch)


def write_table(table: pa.Table, path: Path, compression: str) -> str:
    """Write one Parquet file atomically; return its SHA-256."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression=None if compression == "none" else compression,
                       use_dictionary=["sample_id", "segment"], write_statistics=["sample_idx", "position"])
        digest = sha256_file(tmp)
    return digest


def verified_shards(root: Path, key: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Shards a previous run proved complete: same inputs (key) and every file's hash intact."""
    partial = root / PARTIAL
    if not partial.exists():
        return {}
    progress = read_json(partial)
    if progress.get("key") != key:
        return {}
    done = {}
    for shard in progress.get("shards", []):
        files = shard["files"]
        if all((root / rel).is_file() and sha256_file(root / rel) == digest for rel, digest in files.items()):
            done[shard["index"]] = shard
    return done


def write_progress(root: Path, key: dict[str, Any], shards: dict[int, dict[str, Any]]) -> None:
    """Record the shards completed so far."""
    write_json(root / PARTIAL, {"format": FORMAT, "key": key, "shards": [shards[i] for i in sorted(shards)]})


def remove_stale(root: Path, keep: set[str]) -> None:
    """Delete layer files that are not listed in keep (leftovers of other inputs)."""
    for path in root.glob("layer=*/*.parquet"):
        if str(path.relative_to(root)) not in keep:
            path.unlink()


def finish(root: Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json (marks the dataset complete) and drop the progress file."""
    write_json(root / MANIFEST, manifest)
    (root / PARTIAL).unlink(missing_ok=True)


def load_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a complete KV dataset."""
    manifest = read_json(Path(root) / MANIFEST)
    if manifest.get("format") != FORMAT:
        raise KvpipeError(f"{root}/{MANIFEST}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def shard_digests(manifest: dict[str, Any]) -> dict[str, str]:
    """SHA-256 of every layer file the manifest lists, by relative path."""
    return {rel: digest for shard in manifest["shards"] for rel, digest in shard["files"].items()}


def read_layer(root: Path, layer: int, columns: list[str] | None = None) -> pa.Table:
    """All rows of one layer, ordered by sample then position; every shard is verified like read_shard's."""
    manifest = load_manifest(root)
    if layer not in manifest["layers"]:
        raise KvpipeError(f"{root}: no data for layer {layer}")
    tables = [read_shard(root, layer, shard["index"], columns, manifest) for shard in manifest["shards"]]
    table = pa.concat_tables(tables)
    return table.sort_by([("sample_idx", "ascending"), ("position", "ascending")])


def read_shard(root: Path, layer: int, shard: int, columns: list[str] | None = None,
               manifest: dict[str, Any] | None = None) -> pa.Table:
    """One (layer, shard) file, its SHA-256 checked against the manifest (loaded if not given).

    The file is read once into memory and hashed in a thread while pyarrow decodes the same buffer,
    so the check adds little to the read; memory stays bounded by one shard.
    """
    rel = shard_file(layer, shard)
    path = Path(root) / rel
    expected = shard_digests(manifest if manifest is not None else load_manifest(root)).get(rel)
    if expected is None:
        raise KvpipeError(f"{path}: not listed in {Path(root) / MANIFEST}; rerun extraction (extract_kv_chunk)")
    if not path.is_file():
        raise KvpipeError(f"{path}: missing shard file; rerun extraction (extract_kv_chunk)")
    data = path.read_bytes()
    digest = _HASHER.submit(lambda: hashlib.sha256(data).hexdigest())
    try:
        return pq.read_table(pa.BufferReader(data), columns=columns)
    finally:  # a damaged file is reported as such, whatever decoding it raised
        if digest.result() != expected:
            raise KvpipeError(f"{path}: SHA-256 does not match {MANIFEST} (corrupted or truncated shard); "
                              "rerun extraction (extract_kv_chunk)") from None


def matrix(table: pa.Table, kind: str) -> np.ndarray:
    """A vector column as a float32 [rows, width] array."""
    column = table.column(kind).combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(len(column), -1)

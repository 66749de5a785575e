"""Parquet write and read throughput of kvpipe's KV shards (kvpipe.kv.store), per model width.

    python bench/parquet_bench.py      # -> results/parquet.json

One (layer, shard) file of `--rows` token rows at each width (num_kv_heads x head_dim of the
offline pair: 128 and 256) holds float16 key, pre-RoPE key and value vectors drawn from a normal
distribution (KV caches compress about as poorly), written with the extraction's settings (zstd;
and without compression), then read back with `read_shard`, whose SHA-256 check is part of every
read. Throughput is raw tensor bytes (3 kinds x rows x width x 2 B) per second, median of
`--repeats`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from benchkit import RECORDS, write_record

from kvpipe.kv import store


def one(width: int, rows: int, compression: str, repeats: int, root: Path) -> dict:
    rng = np.random.default_rng(0)
    meta = {"sample_idx": np.repeat(np.arange(8), rows // 8), "sample_id": np.repeat([f"s{i}" for i in range(8)], rows // 8),
            "position": np.tile(np.arange(rows // 8), 8), "segment": np.ones(rows, dtype=np.int8),
            "token_id": rng.integers(0, 150_000, rows), "char_start": np.arange(rows), "char_end": np.arange(rows) + 1}
    vectors = {kind: rng.standard_normal((rows, width)).astype(np.float16) for kind in store.KINDS}
    table = store.build_table(meta, vectors, store.schema(width, "float16"))
    raw = sum(v.nbytes for v in vectors.values())
    rel = store.shard_file(0, 0)
    writes, reads = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        digest = store.write_table(table, root / rel, compression)
        writes.append(time.perf_counter() - started)
        manifest = {"shards": [{"files": {rel: digest}}]}
        started = time.perf_counter()
        back = store.read_shard(root, 0, 0, manifest=manifest)
        reads.append(time.perf_counter() - started)
        assert back.num_rows == rows
    write_s, read_s = statistics.median(writes), statistics.median(reads)
    return {"width": width, "rows": rows, "compression": compression, "raw_mb": round(raw / 1e6, 2),
            "file_mb": round((root / rel).stat().st_size / 1e6, 2), "write_mb_s": round(raw / 1e6 / write_s, 1),
            "read_mb_s": round(raw / 1e6 / read_s, 1), "write_s": round(write_s, 4), "read_s": round(read_s, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RECORDS / "parquet.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [one(width, args.rows, compression, args.repeats, Path(tmp))
                for width in (128, 256) for compression in ("zstd", "none")]
    write_record(args.out, {"runs": runs})
    for run in runs:
        print(run)


if __name__ == "__main__":
    main()

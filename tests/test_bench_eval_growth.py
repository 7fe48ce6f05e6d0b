"""bench/bench_eval.py's memory-growth report (issue 26): bytes per document between corpus sizes, and how much of it
is the search block, which grows with the corpus only until it holds `block_rows_for(dim)` rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_eval  # noqa: E402

from reforge.eval.search import block_rows_for  # noqa: E402

MIB = 2**20


def point(documents: int, mode: str, mib: float) -> dict:
    return {"documents": documents, "mode": mode, "median_peak_rss_mib": mib}


def test_growth_separates_the_search_blocks_one_time_growth_from_what_grows_per_document():
    dim = 256
    block = block_rows_for(dim)
    assert block == 65_536  # 64 MiB of float32 rows at 256 dimensions
    block_40k = 40_000 * dim * 4 / MIB  # the block at 40,000 documents: 39.1 MiB; from 65,536 on: 64 MiB
    per_doc = 50 / MIB  # 50 bytes a document beyond the block
    rss = {n: 600 + min(n, block) * dim * 4 / MIB + n * per_doc for n in (40_000, 160_000, 1_000_000)}
    runs = [point(n, "cache", mib) for n, mib in rss.items()][::-1]  # any order: sorted by size
    report = bench_eval.growth(runs, dim)
    assert report["search_block_rows"] == block and report["search_block_mib"] == 64.0
    first, second = report["growth"]["cache"]["steps"]
    assert (first["from"], first["to"], second["from"], second["to"]) == (40_000, 160_000, 160_000, 1_000_000)
    assert first["block_growth_mib"] == round(64 - block_40k, 1) and second["block_growth_mib"] == 0.0
    assert first["bytes_per_document"] == round((64 - block_40k) * MIB / 120_000 + 50)  # 268: the block weighs in
    assert first["beyond_block"] == 50 and second["beyond_block"] == second["bytes_per_document"] == 50
    assert report["growth"]["cache"]["above_block"] == {"from": 160_000, "to": 1_000_000, "bytes_per_document": 50}


def test_combine_reads_points_saved_by_separate_runs_and_refuses_mixed_widths(tmp_path):
    def saved(name: str, dim: int, runs: list[dict]) -> str:
        path = tmp_path / name
        path.write_text(json.dumps({"date": name, "load_average_before_after": [1.0, 2.0], "dim": dim, "runs": runs}))
        return str(path)

    small = saved("small", 256, [point(80_000, "cache", 700.0), point(160_000, "no-cache", 690.0)])
    large = saved("large", 256, [point(1_000_000, "cache", 740.0), point(1_000_000, "no-cache", 730.0)])
    report = bench_eval.combine([small, large])
    assert report["growth"]["cache"]["above_block"]["bytes_per_document"] == round(40 * MIB / 920_000)  # 46
    assert report["growth"]["no-cache"]["steps"][0]["bytes_per_document"] == round(40 * MIB / 840_000)  # 50
    assert {r["measured"] for r in report["runs"]} == {"small", "large"}
    with pytest.raises(SystemExit, match="different --dim"):
        bench_eval.combine([small, saved("narrow", 32, [point(40_000, "cache", 650.0)])])

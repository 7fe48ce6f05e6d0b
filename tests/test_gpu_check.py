"""bench/gpu_check.py --smoke (what `make gpu-check SMOKE=1` runs): the whole device check on the CPU at tiny sizes,
so the one command a GPU session runs cannot rot between GPU sessions."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import gpu_check  # noqa: E402


def test_smoke_runs_every_part_and_says_what_it_skipped(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--json", str(out), "--tmp", str(tmp_path)]) == 0
    report = json.loads(out.read_text())
    assert report["status"] == "passed" and report["meta"]["smoke"] and report["skipped"] == []
    parts = report["parts"]
    assert list(parts) == ["tests", "memory", "search", "bench"]
    tests = parts["tests"]
    assert tests["status"] == "passed" and tests["counts"]["failed"] == tests["counts"]["error"] == 0
    by_outcome = {}
    for case in tests["cases"]:
        by_outcome.setdefault(case["outcome"], []).append(case)
    # flex's gradients need CUDA: its 8 cases (4 families x 2 dtypes) compare logits, then skip saying why
    assert len(by_outcome["skipped"]) == 8
    assert all("no backward on cpu" in c["why"] and "flex" in c["test"] for c in by_outcome["skipped"])
    assert len(by_outcome["passed"]) == 11  # padded vs split x 8, merge/diff, DoRA norms x 2
    memory = parts["memory"]
    assert memory["status"] == "skipped" and "no CUDA allocator" in memory["why"]
    off, on = memory["rows"]
    assert off["planned_peak_bytes"] > on["planned_peak_bytes"] > 0 and off["tokens_per_step"] == 4 * 64
    search = parts["search"]
    assert search["status"] == "passed" and search["top_k_overlap"] == 1.0
    assert search["runs"]["torch kernel"]["queries_with_same_top_k_order"] == 1.0
    names = [row["name"] for row in parts["bench"]["rows"]]
    assert "reforge train (paper batching, padded attention)" in names and len(names) == 6
    screen = capsys.readouterr().out.split("gpu-check (smoke, CPU)")[-1]
    assert "PASSED" in screen and "flex_attention has no backward on cpu" in screen
    assert len(screen.splitlines()) < 40  # one screen


def test_without_cuda_the_full_check_refuses_and_points_to_smoke(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        return
    assert gpu_check.main(["--json", str(tmp_path / "x.json")]) == 2
    assert "--smoke" in capsys.readouterr().out and not (tmp_path / "x.json").exists()


def test_a_part_that_breaks_fails_the_check_and_the_rest_still_runs(tmp_path, monkeypatch):
    def broken(device, size, tmp):
        raise RuntimeError("search kernel exploded")

    monkeypatch.setattr(gpu_check, "_search", broken)
    out = tmp_path / "check.json"
    assert gpu_check.main(["--smoke", "--parts", "search", "memory", "--json", str(out), "--tmp", str(tmp_path)]) == 1
    report = json.loads(out.read_text())
    assert report["status"] == "failed" and report["parts"]["search"]["status"] == "error"
    assert "search kernel exploded" in report["parts"]["search"]["error"]
    assert report["parts"]["memory"]["status"] == "skipped"  # ran after the broken part

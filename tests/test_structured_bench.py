"""The structured-pruning benchmark runs end to end on its --quick model."""

from __future__ import annotations

import json
import sys

from benchmarks import structured


def test_quick_run_writes_every_method_row(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["structured", "--quick", "--out", str(tmp_path)])
    structured.main()
    records = json.loads((tmp_path / "structured-quick.json").read_text())
    table = (tmp_path / "structured-quick.md").read_text()
    labels = [row.label for row in structured.ROWS]
    assert [record["method"] for record in records] == labels
    for label in labels:
        # one line per table: quality, metric, size and the two speed-ups
        assert table.count(f"| `{label}` |") == len(structured.FIELDS)
    for record in records:
        assert record["ratio"] == 0.5
        assert record["size_pruned"] < record["size_original"]
        assert record["latency_pruned_b1_ms"] > 0 and record["latency_pruned_b512_ms"] > 0
        assert record["output_mse"] >= 0
    # the recommended mode refits: better than dropping units with no compensation at all
    by_label = {record["method"]: record for record in records}
    assert by_label[labels[0]]["output_mse"] < by_label["ec --no-compensate"]["output_mse"]

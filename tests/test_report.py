"""Report helpers the book calls: the benchmark tables read the committed benchmarks/results/*.json."""
import json
from pathlib import Path

from refinevla import report

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_tables_show_each_result_with_its_target(tmp_path):
    results = report.benchmark_results(ROOT)
    tables = {name: (table, note) for name, table, note in report.benchmark_tables(results)}
    assert set(tables) == {p.stem for p in (ROOT / "benchmarks" / "results").glob("*.json")}
    table, note = tables["annotate_throughput"]
    assert list(table["concurrency"][:4]) == [1, 4, 16, 64] and "target ratio >= 0.8" in note
    assert (table["ratio to ideal"].round(2) == (table["requests/s"] / table["ideal/s"]).round(2)).all()
    table, note = tables["train_memory_speed"]
    assert {"fp32_peak_mb", "nf4_peak_mb", "peak_ratio"} <= set(table.columns) and "0.4 x fp32" in note

    # a benchmark the report does not know is still shown, flattened
    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "benchmarks" / "results" / "new_one.json").write_text(json.dumps({"a": {"b": 3}, "when": "now"}))
    [(name, table, note)] = report.benchmark_tables(report.benchmark_results(tmp_path))
    assert name == "new_one" and table.loc["a.b", "value"] == 3 and "now" in note

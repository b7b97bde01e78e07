"""Report: table rows, JSON/Markdown/PNG files, Pareto front."""
import json

from rich.console import Console

from prunequant.report import markdown_report, pareto_front, table_rows, write_report


def runs():
    base = {"texts": {"wiki": {"perplexity": 25.0, "seq_len": 512, "tokens": 20480, "text_sha256": "ab" * 32}},
            "tasks": {"arc_easy": {"acc": 0.55, "acc_norm": 0.5, "n": 200, "chance": 0.25, "source": "ARC-Easy"}}}
    return [
        {"name": "original", "tcr": 0.0, "metrics": base, "retention": {"ppl:wiki": 1.0, "task:arc_easy": 1.0}},
        {"name": "w4g128", "tcr": 0.75, "metrics": {"texts": {"wiki": {"perplexity": 27.0}}},
         "retention": {"ppl:wiki": 25 / 27, "kl": 0.95}},
        {"name": "50%+w4", "tcr": 0.875, "metrics": {}, "retention": {"ppl:wiki": 0.5, "kl": 0.7}},
        {"name": "bad-w8", "tcr": 0.5, "metrics": {}, "retention": {"ppl:wiki": 0.6}},
    ]


def test_pareto_front():
    pts = [(0.0, 1.0), (0.75, 0.94), (0.875, 0.6), (0.5, 0.6), (0.75, 0.94)]
    assert pareto_front(pts) == [0, 1, 2]


def test_table_rows_and_markdown():
    header, rows = table_rows(runs())
    assert header == ["measure", "original", "w4g128", "50%+w4", "bad-w8"]
    by = {r[0]: r[1:] for r in rows}
    assert list(by)[:3] == ["ppl:wiki", "task:arc_easy", "kl"]
    assert by["ppl:wiki"][0] == "25.00 [1.000]" and by["ppl:wiki"][1] == "27.00 [0.926]"
    assert by["Sr"][0] == "1.0000" and by["TCr"][2] == "0.8750"
    md = markdown_report(runs())
    assert "| measure | original |" in md and "ARC-Easy (n=200" in md and "L=512" in md


def test_write_report_files(tmp_path):
    con = Console(record=True, width=140)
    files = write_report(runs(), tmp_path / "rep", console=con)
    assert set(files) == {"json", "markdown", "retention_png", "pareto_png"}
    for f in files.values():
        assert f.exists() and f.stat().st_size > 0
    assert files["retention_png"].read_bytes()[:4] == b"\x89PNG"
    data = json.loads(files["json"].read_text())
    assert [r["name"] for r in data["runs"]][:2] == ["original", "w4g128"] and data["runs"][1]["sr"] > 0.9
    assert "w4g128" in con.export_text()


def test_single_run_without_retention(tmp_path):
    files = write_report({"name": "m", "metrics": {"texts": {"wiki": 12.0}}}, tmp_path, show=False)
    assert set(files) == {"json", "markdown"}
    assert "12.00" in files["markdown"].read_text()

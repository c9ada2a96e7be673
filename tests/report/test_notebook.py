"""llmlab/report/notebook.py: report.md split into markdown and figures in reading order, minus the long
configuration / environment sections (the notebooks in notebooks/ display it with IPython)."""

from __future__ import annotations

from llmlab.report.notebook import report_parts


def test_report_parts_in_order_without_the_skipped_sections(tmp_path):
    (tmp_path / "report.md").write_text(
        "# run\n\nintro\n\n![curves](curves.png)\n\nbetween\n\n## Configuration\n\n| a | 1 |\n\n"
        "## Results\n\n![lr](lr.png)\n\n## Environment\n\ntorch\n",
        encoding="utf-8",
    )
    parts = report_parts(tmp_path)
    assert [k for k, _ in parts] == ["markdown", "image", "markdown", "image"]
    assert [v for k, v in parts if k == "image"] == [tmp_path / "curves.png", tmp_path / "lr.png"]
    text = "".join(v for k, v in parts if k == "markdown")
    assert "intro" in text and "between" in text and "## Results" in text
    assert "Configuration" not in text and "torch" not in text

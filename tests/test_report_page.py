"""The report's front page fragment: the summary as an HTML table, the figures inline with captions."""

import base64

import pytest

from ncrobust.figures.report_page import front_page, markdown_table_html

SUMMARY = "| adversary | nc1_clean |\n|---|---|\n| st | 0.31 ± 0.02 |\n| pgd-linf | 0.70 <x> |\n"


def test_markdown_table_becomes_an_escaped_html_table():
    out = markdown_table_html(SUMMARY)
    assert out.count("<tr>") == 3 and "<th>nc1_clean</th>" in out
    assert "<td>0.31 ± 0.02</td>" in out and "&lt;x&gt;" in out


def test_text_that_is_no_pipe_table_is_an_error():
    with pytest.raises(ValueError, match="not a Markdown pipe table"):
        markdown_table_html("| a | b |\n| 1 | 2 |\n")


def test_front_page_has_the_table_and_each_figure_with_its_caption(tmp_path):
    (tmp_path / "summary.md").write_text(SUMMARY)
    png = b"\x89PNG\r\n\x1a\n fake"
    (tmp_path / "leap.png").write_bytes(png)
    out = tmp_path / "front.html"
    front_page(tmp_path / "summary.md", {"leap": str(tmp_path / "leap.png")}, {"leap": "**Leap matrix.** Entry ``L[y, k]``."}, out)
    text = out.read_text()
    assert "<td>st</td>" in text
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in text
    assert "<strong>Leap matrix.</strong>" in text and "L[y, k]" in text
    with pytest.raises(ValueError, match="no caption for figure"):
        front_page(tmp_path / "summary.md", {"leap": str(tmp_path / "leap.png")}, {}, out)

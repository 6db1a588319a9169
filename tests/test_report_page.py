"""The report's front door: the overview (what the run is, the summary grouped and rounded) and
the standalone front page, checked as text and, with Chromium, as a reader sees them."""

import base64

import pandas as pd
import pytest

from browser_helpers import CHROMIUM, NO_CHROMIUM, layout
from ncrobust.figures.report_page import front_page, summary_html

RUN = {"grid": {"dataset": ["digits"], "model": ["mlp"], "loss": ["ce"], "adversary": ["st", "pgd-linf"], "seed": [1, 2]},
       "epochs": 4, "perturbations": ["clean", "pgd"]}


def _summary(rows: int = 2) -> pd.DataFrame:
    advs = ["st", "pgd-linf", "trades-linf", "pgd-l2"][:rows]
    return pd.DataFrame({
        "dataset": "digits", "model": "mlp", "loss": "ce", "adversary": advs, "variant": "base", "seeds": 2, "epoch": 4,
        "test_accuracy_mean": 0.98765, "test_accuracy_std": 0.0123,
        "nc1_clean_mean": 0.0012345, "nc1_clean_std": 0.0004,
        "alignment_angle_pgd_mean": 12.345, "alignment_angle_pgd_std": float("nan"),
        "leap_rate_pgd_mean": [0.5 + i / 10 for i in range(rows)], "leap_rate_pgd_std": 0.01,
    })


def test_summary_is_rounded_grouped_and_one_row_per_cell():
    out = summary_html(_summary())
    assert out.count("<tr>") == 2 + 2  # two header rows (groups, quantities), one row per cell
    assert ">98.8<" in out and "±1.2" in out  # accuracy in percent, one decimal, with its spread
    assert ">0.00123<" in out and ">12.3<" in out  # NC to three digits; the angle in degrees, no spread (NaN)
    assert 'colspan="1">Accuracy (%)' in out and "Neural Collapse, clean train" in out and "Minority classes" not in out
    assert ">adversary<" in out and ">loss<" not in out  # constant keys go to the note above the table
    assert "dataset digits; model mlp; loss ce; variant base; 2 seeds per row; epoch 4" in out


def test_an_empty_summary_says_so():
    assert "The summary is empty" in summary_html(_summary().iloc[0:0])


def test_front_page_is_a_complete_page_with_the_overview_and_each_figure(tmp_path):
    _summary().to_parquet(tmp_path / "summary.parquet")
    png = b"\x89PNG\r\n\x1a\n fake"
    (tmp_path / "leap.png").write_bytes(png)
    page, overview = tmp_path / "front.html", tmp_path / "overview.html"
    front_page(tmp_path / "summary.parquet", {"leap": str(tmp_path / "leap.png")},
               {"leap": "**Leap matrix.** Entry ``L[y, k]``."}, page, overview, RUN)
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and '<meta charset="utf-8">' in text and "<style>" in text
    assert "<h1>ncrobust: Neural Collapse under adversarial perturbation</h1>" in text
    assert "training adversary st, pgd-linf; seed 1, 2; 4 epochs" in text
    assert overview.read_text().strip() in text and "<html" not in overview.read_text()
    assert f"data:image/png;base64,{base64.b64encode(png).decode()}" in text
    assert "<strong>Leap matrix.</strong>" in text and "L[y, k]" in text
    with pytest.raises(ValueError, match="no caption for figure"):
        front_page(tmp_path / "summary.parquet", {"leap": str(tmp_path / "leap.png")}, {}, page, overview, RUN)


def assert_title_and_summary_in_view(box: dict) -> None:
    """The title and the summary table's header rows lie inside the window as it opens."""
    title, table, height = box["title"], box["summary"], box["height"]
    assert title and table, box
    assert 0 <= title["top"] and title["bottom"] <= height and title["left"] >= 0, box
    assert 0 <= table["top"] and table["top"] + 60 <= height and table["left"] >= 0, box


@pytest.mark.slow
@pytest.mark.workflow
@pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)
def test_front_page_opens_on_the_title_and_the_summary_in_chromium(tmp_path):
    _summary(4).to_parquet(tmp_path / "summary.parquet")
    from PIL import Image

    Image.new("RGB", (1500, 6000), "white").save(tmp_path / "tall.png")  # a figure far taller than any window
    page = tmp_path / "front.html"
    front_page(tmp_path / "summary.parquet", {"leap": str(tmp_path / "tall.png")}, {"leap": "**Leap.**"},
               page, tmp_path / "overview.html", RUN)
    for size in ((1400, 900), (1400, 2000), (800, 700)):
        assert_title_and_summary_in_view(layout(page, *size, tmp_path))

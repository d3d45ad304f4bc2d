"""The study figures: every method keeps one colour of its own, also beyond ten methods."""

from __future__ import annotations

from agnostic_sam.analysis import plots


def test_more_than_ten_methods_get_distinct_colours(tmp_path) -> None:
    assert plots._palette(4)[:4] == ["C0", "C1", "C2", "C3"]
    many = plots._palette(14)
    assert len(set(many)) == 14
    rows = {f"row{r}": {f"method{m}": (100.0 + m, 90.0 + m, 89.0 + m, 91.0 + m)
                        for m in range(14)} for r in range(2)}
    path = plots.plot_frontier(rows, tmp_path / "frontier.png", title="a long title " * 12)
    assert path.stat().st_size > 10_000
    series = {"epochs": {"tuned": {f"method{m}": [(0.0, 98.0, 0.5, 10), (0.4, 90.0 + m, 1.0, 10)]
                                   for m in range(14)}}}
    path = plots.plot_protocol(series, tmp_path / "figure.png", xlabel="noise", title="t")
    assert path.stat().st_size > 10_000


def test_long_titles_are_wrapped_to_the_figure() -> None:
    from matplotlib.figure import Figure

    text = plots._wrapped("word " * 40, Figure(figsize=(5.2, 4)))
    assert all(len(line) <= 57 for line in text.splitlines()) and text.count("\n") >= 2

"""The session view's charts as a person reads them (SVG built without a browser)."""

from __future__ import annotations

import re

from cryoflow.view.plots import rates_svg


def test_a_session_of_one_hour_shows_every_rate_not_only_the_bar() -> None:
    """One hour is one point per series: a line through one point is invisible, so each hour
    carries a mark of its own (the browser test saw only the acquired bar)."""
    t = 1_796_000_000_000
    svg = rates_svg({"t": [t], "acquired": [40], "copied": [40], "motioncor": [38], "ctf": [35]})
    marks = re.findall(r'<circle [^>]*class="rate-point"><title>(\d+) (\w+)</title>', svg)
    assert sorted(marks) == sorted([("40", "copied"), ("38", "motioncor"), ("35", "ctf")])
    assert svg.count('class="bar"') == 1

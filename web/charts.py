"""A server-rendered SVG bar chart: no JavaScript library, nothing fetched at run time."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape


def bar_chart(labels: Sequence[str], values: Sequence[int], title: str, unit: str,
              width: int = 600, height: int = 160) -> Markup:
    top = max(values, default=0) or 1
    n = max(len(values), 1)
    slot = width / n
    bars = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        h = round((height - 20) * value / top, 1)
        x = round(i * slot + slot * 0.1, 1)
        bars.append(f'<rect x="{x}" y="{height - 20 - h}" width="{round(slot * 0.8, 1)}" height="{h}" fill="#3b6ea5">'
                    f"<title>{escape(label)}: {value} {escape(unit)}</title></rect>")
    # Every interpolated string is escaped above; the rest are numbers.
    return Markup(f'<svg role="img" aria-label="{escape(title)}" viewBox="0 0 {width} {height}" width="100%" '  # noqa: S704
                  f'xmlns="http://www.w3.org/2000/svg"><title>{escape(title)}</title>'
                  f'<line x1="0" y1="{height - 20}" x2="{width}" y2="{height - 20}" stroke="#888"/>'
                  + "".join(bars) + "</svg>")

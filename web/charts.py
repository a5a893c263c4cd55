"""Server-rendered SVG charts: no JavaScript library, nothing fetched at run time.

Each chart is an `<svg role="img">` named by its `<title>` (and `aria-labelledby`), so a screen
reader announces what it shows; the pages put the same figures in a table next to it, the
accessible alternative to reading bars.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from markupsafe import Markup, escape

_ids = itertools.count(1)


def bar_chart(labels: Sequence[str], values: Sequence[int], title: str, unit: str,
              width: int = 600, height: int = 160) -> Markup:
    """One bar per label (a day), scaled to the largest value."""
    top = max(values, default=0) or 1
    n = max(len(values), 1)
    slot = width / n
    base = height - 20
    chart_id = f"chart-{next(_ids)}"
    bars = []
    for i, (label, value) in enumerate(zip(labels, values, strict=True)):
        h = round(base * value / top, 1)
        x = round(i * slot + slot * 0.1, 1)
        bars.append(f'<rect x="{x}" y="{round(base - h, 1)}" width="{round(slot * 0.8, 1)}" height="{h}" '
                    f'fill="#3b6ea5"><title>{escape(label)}: {value} {escape(unit)}</title></rect>')
    if labels:  # first and last day under the axis, so the reader knows the span
        bars.append(f'<text x="0" y="{height - 4}" font-size="11" fill="#333">{escape(labels[0])}</text>')
        if len(labels) > 1:
            bars.append(f'<text x="{width}" y="{height - 4}" font-size="11" fill="#333" text-anchor="end">'
                        f"{escape(labels[-1])}</text>")
    # Every interpolated string is escaped above; the rest are numbers.
    return Markup(f'<svg role="img" aria-labelledby="{chart_id}" viewBox="0 0 {width} {height}" '  # noqa: S704
                  f'width="100%" xmlns="http://www.w3.org/2000/svg"><title id="{chart_id}">{escape(title)}</title>'
                  f'<line x1="0" y1="{base}" x2="{width}" y2="{base}" stroke="#888"/>'
                  + "".join(bars) + "</svg>")

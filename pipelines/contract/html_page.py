"""The self-contained HTML page both reports share (the preprocessing report and the
trainer's): escaping, tables, sections, inline SVG charts and the stylesheet.

No scripts and no external URLs: a page opens offline and can be mailed or attached to a
ticket. Pure functions from values to HTML text; `write_page` is the only I/O.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence

from PIL import Image

SERIES_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#76b7b2", "#edc948",
                  "#ff9da7", "#9c755f")


def escape(value) -> str:
    return html.escape(str(value), quote=True)


def compact_number(value: float) -> str:
    """Compact number: 1234 -> 1.2k, 0.5 -> 0.5."""
    value = float(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if value != int(value) else str(int(value))


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return step * magnitude
    return 10 * magnitude


def grouped_bar_chart(
    categories: Sequence[str],
    series: Mapping[str, Sequence[float]],
    colours: Mapping[str, str],
    value_label: str = "",
    width: int = 900,
) -> str:
    """Horizontal grouped bars: one group per category, one bar per series. SVG text."""
    names = list(series)
    bar, gap = 12, 10
    label_w, right = 170, 60
    group_h = bar * len(names) + gap
    top = 28
    height = top + group_h * len(categories) + 24
    peak = _nice_max(max((v for values in series.values() for v in values), default=0))
    plot_w = width - label_w - right
    parts = [_svg_open(width, height, f"bar chart of {value_label}")]
    for i, name in enumerate(names):  # legend
        x = label_w + i * 130
        parts.append(f'<rect x="{x}" y="6" width="12" height="12" fill="{colours[name]}"/>'
                     f'<text x="{x + 16}" y="16" class="legend">{escape(name)}</text>')
    for tick in range(5):
        x = label_w + plot_w * tick / 4
        parts.append(f'<line x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{height - 20}" '
                     f'class="grid"/><text x="{x:.1f}" y="{height - 6}" class="tick" '
                     f'text-anchor="middle">{compact_number(peak * tick / 4)}</text>')
    for c, category in enumerate(categories):
        y0 = top + c * group_h
        parts.append(f'<text x="{label_w - 8}" y="{y0 + group_h / 2 + 1:.1f}" class="cat" '
                     f'text-anchor="end">{escape(clip(category, 24))}<title>{escape(category)}'
                     '</title></text>')
        for s, name in enumerate(names):
            value = series[name][c]
            w = plot_w * value / peak
            y = y0 + s * bar
            parts.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar - 2}" '
                         f'fill="{colours[name]}"><title>{escape(category)} / {escape(name)}: '
                         f'{value:g}</title></rect>')
            if value:
                parts.append(f'<text x="{label_w + w + 4:.1f}" y="{y + bar - 3}" '
                             f'class="val">{compact_number(value)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def histogram_chart(
    buckets: Sequence[tuple[float, float, float]],
    x_label: str,
    width: int = 440,
    height: int = 220,
    colour: str = SERIES_COLOURS[0],
) -> str:
    """Vertical bars, one per bucket (equal widths: log buckets read as a log axis)."""
    if not buckets:
        return '<p class="muted">no data</p>'
    left, bottom, top = 44, 40, 12
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = _nice_max(max(count for _, _, count in buckets))
    step = plot_w / len(buckets)
    parts = [_svg_open(width, height, f"histogram of {x_label}")]
    parts.append(_value_grid(left, width - 10, top, plot_h, peak))
    label_every = max(1, math.ceil(len(buckets) / 8))
    for i, (low, high, count) in enumerate(buckets):
        h = plot_h * count / peak
        x = left + i * step
        parts.append(f'<rect x="{x + 1:.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{max(step - 2, 1):.1f}" height="{h:.1f}" fill="{colour}">'
                     f'<title>{compact_number(low)}-{compact_number(high)}: {count:g}'
                     '</title></rect>')
        if i % label_every == 0:
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" class="tick">'
                         f'{compact_number(low)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" class="axis" '
                 f'text-anchor="middle">{escape(x_label)}</text></svg>')
    return "".join(parts)


def column_chart(
    items: Sequence[tuple[str, float, str]],
    y_label: str,
    width: int = 900,
    height: int = 220,
) -> str:
    """Vertical bars (label, value, colour), e.g. one per shard."""
    if not items:
        return '<p class="muted">no data</p>'
    left, bottom, top = 56, 28, 12
    plot_w, plot_h = width - left - 10, height - bottom - top
    peak = _nice_max(max(value for _, value, _ in items))
    step = min(plot_w / len(items), 48)  # a handful of shards must not look like walls
    parts = [_svg_open(width, height, f"chart of {y_label}")]
    parts.append(_value_grid(left, width - 10, top, plot_h, peak))
    for i, (label, value, colour) in enumerate(items):
        h = plot_h * value / peak
        parts.append(f'<rect x="{left + i * step + 1:.1f}" y="{top + plot_h - h:.1f}" '
                     f'width="{max(step - 2, 1):.1f}" height="{h:.1f}" fill="{colour}">'
                     f'<title>{escape(label)}: {compact_number(value)}</title></rect>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" class="axis" '
                 f'text-anchor="middle">{escape(y_label)}</text></svg>')
    return "".join(parts)


def line_chart(xs: Sequence[float], series: Mapping[str, Sequence[float | None]],
               x_label: str, y_label: str, width: int = 440, height: int = 240) -> str:
    """One polyline per series over shared x values (None or NaN: left out), a legend."""
    values = [v for vs in series.values() for v in vs if v is not None and math.isfinite(v)]
    if not xs or not values:
        return '<p class="muted">no data</p>'
    left, bottom, top, right = 48, 40, 24, 12
    plot_w, plot_h = width - left - right, height - bottom - top
    peak = _nice_max(max(values))
    low, span = min(xs), (max(xs) - min(xs)) or 1

    def point(x, y):
        return left + plot_w * (x - low) / span, top + plot_h * (1 - y / peak)

    parts = [_svg_open(width, height, f"{y_label} by {x_label}")]
    parts.append(_value_grid(left, width - right, top, plot_h, peak))
    for x in xs:
        parts.append(f'<text x="{point(x, 0)[0]:.1f}" y="{top + plot_h + 14}" class="tick" '
                     f'text-anchor="middle">{compact_number(x)}</text>')
    for i, (name, ys) in enumerate(series.items()):
        colour = SERIES_COLOURS[i % len(SERIES_COLOURS)]
        points = [point(x, y) for x, y in zip(xs, ys, strict=True)
                  if y is not None and math.isfinite(y)]
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" '
                     f'stroke-width="2"><title>{escape(name)}</title></polyline>')
        parts.extend(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="2.5" fill="{colour}"/>'
                     for px, py in points)
        parts.append(f'<rect x="{left + 8 + i * 110}" y="6" width="12" height="12" '
                     f'fill="{colour}"/><text x="{left + 24 + i * 110}" y="16" '
                     f'class="legend">{escape(name)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 6}" class="axis" '
                 f'text-anchor="middle">{escape(x_label)}</text></svg>')
    return "".join(parts)


def _value_grid(left: float, right: float, top: float, plot_h: float, peak: float) -> str:
    """Five horizontal grid lines from 0 to `peak`, each labelled at the left."""
    parts = []
    for tick in range(5):
        y = top + plot_h * (1 - tick / 4)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{right}" y2="{y:.1f}" '
                     f'class="grid"/><text x="{left - 4}" y="{y + 3:.1f}" class="tick" '
                     f'text-anchor="end">{compact_number(peak * tick / 4)}</text>')
    return "".join(parts)


def _svg_open(width: int, height: int, title: str) -> str:
    return (f'<svg width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">')


def clip(text: str, length: int) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def table(header: Sequence[str], rows: Iterable[Sequence], numeric: Sequence[int] = ()) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    lines = []
    for row in rows:
        cells = "".join(
            f'<td class="num">{escape(v)}</td>' if i in numeric else f"<td>{escape(v)}</td>"
            for i, v in enumerate(row))
        lines.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>"


def section(key: str, title: str, content: str) -> str:
    return f'<section id="{key}"><h2>{escape(title)}</h2>{content}</section>'


def page(title: str, heading: str, subtitle: str, sections: Sequence[tuple[str, str]],
         body: Iterable[str]) -> str:
    """The whole document: a header with `heading`, `subtitle` and a link to each of
    `sections` ((key, title) pairs, keys as `section` gives them), then `body`."""
    nav = "".join(f'<a href="#{key}">{escape(name)}</a>' for key, name in sections)
    return (
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<title>{escape(title)}</title>"
        f"<style>{CSS}</style></head><body>"
        f"<header><h1>{escape(heading)}</h1><p class=\"muted\">{subtitle}</p>"
        f"<nav>{nav}</nav></header><main>"
        + "".join(body)
        + "</main></body></html>\n"
    )


def image_data_uri(image: Image.Image, side: int, quality: int = 85) -> str:
    """`image` shrunk to fit `side` x `side`, as a JPEG data URI for an <img>."""
    image = image.convert("RGB")
    image.thumbnail((side, side), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def write_page(path: str, text: str) -> None:
    """Writes the page to `path` (local or gs://)."""
    # Imported here: the trainer renders pages too and need not load Beam to do so.
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path, mime_type="text/html") as handle:
        handle.write(text.encode("utf-8"))


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
color:#222;background:#f6f7f9}
header{background:#1f2d3d;color:#fff;padding:18px 28px 10px}
header h1{margin:0 0 4px;font-size:22px}header .muted{color:#c9d3de}
nav{margin-top:10px;display:flex;flex-wrap:wrap;gap:4px 14px}
nav a{color:#9fd0ff;text-decoration:none;font-size:13px}
main{max-width:1180px;margin:0 auto;padding:10px 24px 40px}
section{background:#fff;border:1px solid #e2e5ea;border-radius:8px;margin:16px 0;
padding:8px 20px 16px}
h2{font-size:18px;margin:10px 0}h3{font-size:15px;margin:14px 0 6px}
.muted{color:#6b7785}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0 12px}
.card{border:1px solid #e2e5ea;border-radius:6px;padding:8px 14px;min-width:110px}
.card .big{font-size:22px;font-weight:600}.card.bad{border-color:#e15759;background:#fff4f4}
.bad-text{color:#c0392b;font-weight:600}.good-text{color:#2e7d32;font-weight:600}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border-bottom:1px solid #eceef1;padding:4px 10px;text-align:left;vertical-align:top;
white-space:pre-wrap;word-break:break-all}
th{background:#f0f2f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafbfc}
svg text{font:11px system-ui,sans-serif;fill:#333}svg .grid{stroke:#e6e8eb}
svg .tick{fill:#6b7785;font-size:10px}svg .axis{fill:#444}svg .val{fill:#555;font-size:10px}
.grid2{display:grid;grid-template-columns:repeat(auto-fill,minmax(450px,1fr));gap:6px}
figure{margin:4px 0}figcaption{color:#6b7785;font-size:12px;text-align:center}
.chart{overflow-x:auto}
.swatch{display:inline-block;width:11px;height:11px;border-radius:2px;margin:0 4px 0 8px;
vertical-align:-1px}
.thumbrow{display:flex;align-items:center;border-top:1px solid #eceef1;padding:6px 0}
.thumblabel{width:150px;font-weight:600;word-break:break-all;padding-right:10px}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}
.thumbs img{border:3px solid #999;border-radius:3px;display:block}
pre{background:#f6f7f9;padding:10px;border-radius:6px;overflow-x:auto;font-size:12px}
details summary{cursor:pointer;color:#36597a;margin:6px 0}
"""

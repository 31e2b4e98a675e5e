"""The stack's HTML report (``OUT.html``) and the batch's index page.

One self-contained file that opens from disk: the preview and the coverage
and rejection maps are inline PNG (``data:`` URIs), the plots against time
and the colour bars inline SVG drawn here (no plotting library to import:
the report costs milliseconds), the per-frame table sorts with a few lines of
inline JavaScript, nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

#: The per-frame table: (column title, report key, format).
FRAME_COLUMNS = (
    ("stars", "stars", "{:d}"), ("FWHM px", "fwhm_px", "{:.2f}"), ("roundness", "roundness", "{:.3f}"),
    ("background", "background", "{:.5f}"), ("noise", "noise", "{:.5f}"), ("weight", "weight", "{:.3f}"),
    ("residual px", "residual_px", "{:.3f}"), ("rejected %", "rejected_pct", "{:.2f}"),
)

#: Quantities plotted against time: (report key, axis label).
TIME_PLOTS = (("fwhm_px", "FWHM (px)"), ("stars", "stars"), ("background", "background"),
              ("weight", "weight"), ("residual_px", "registration residual (px)"))

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;background:#fff}
h1{font-size:1.4em;margin:0 0 .3em} h2{font-size:1.1em;margin:1.2em 0 .4em}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(420px,1fr));gap:1em}
img{max-width:100%;height:auto;border:1px solid #ddd} svg{max-width:100%;height:auto}
figure.map{margin:0} figure.map img{display:block}
table{border-collapse:collapse;font-size:.85em} td,th{border:1px solid #ddd;padding:2px 6px;text-align:right}
th{background:#f2f2f2;cursor:pointer;user-select:none} td.l,th.l{text-align:left}
tr.skip td{color:#999} .kv td:first-child{text-align:left;font-weight:600}
"""

_SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function(th, col){
  th.addEventListener('click', function(){
    var tb = th.closest('table').tBodies[0], rows = Array.from(tb.rows);
    var dir = th.dataset.dir === 'asc' ? -1 : 1; th.dataset.dir = dir === 1 ? 'asc' : 'desc';
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y);
      if (!isNaN(nx) || !isNaN(ny)) {
        if (isNaN(nx)) return 1; if (isNaN(ny)) return -1; return dir * (nx - ny);
      }
      return dir * String(x).localeCompare(String(y));
    });
    rows.forEach(function(r){ tb.appendChild(r); });
  });
});
"""


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def preview_uri(stretched: np.ndarray, *, max_side: int = 1200) -> str:
    """The stretched preview (or its ``to_8bit`` copy) as an inline PNG, at most ``max_side`` px on its longer side."""
    from PIL import Image

    from skystack.engine.output import png_bytes
    from skystack.engine.stretch import to_8bit

    img = Image.fromarray(to_8bit(stretched))
    img.thumbnail((max_side, max_side))
    return _png_uri(png_bytes(np.asarray(img)))


def _times(frames: Sequence[dict[str, Any]]) -> tuple[np.ndarray, str]:
    """Minutes since the first frame, or the frame index when the frames carry no time."""
    from skystack.engine.report import _utc

    ts = [_utc(f.get("timestamp")) for f in frames]
    if ts and all(t is not None for t in ts):
        t0 = min(ts)
        return np.array([(t - t0).total_seconds() / 60.0 for t in ts]), "minutes since the first light"
    return np.arange(len(frames), dtype=float), "frame number"


#: Matplotlib's viridis at 33 evenly spaced stops (linear interpolation between them is within 2 levels).
_VIRIDIS = ("440154 470d60 48186a 482374 472d7b 453781 424086 3e4989 3b528b 375b8d 33638d 2f6b8e 2c728e "
            "297a8e 26828e 23898e 21918c 1f978b 1f9f88 21a685 27ad81 31b57b 3dbc74 4cc26c 5cc863 6ece58 "
            "81d34d 95d840 aadc32 c0df25 d5e21a eae51a fde725")
_USED, _SKIPPED = "#1f77b4", "#d62728"  # the used frames' curve, the skipped frames' hollow marks


def _viridis_lut() -> np.ndarray:
    """``(256, 3)`` uint8 viridis colours."""
    stops = np.array([[int(h[i:i + 2], 16) for i in (0, 2, 4)] for h in _VIRIDIS.split()], dtype=np.float64)
    x = np.linspace(0.0, 255.0, stops.shape[0])
    return np.rint(np.stack([np.interp(np.arange(256), x, stops[:, c]) for c in range(3)], axis=1)).astype(np.uint8)


def _ticks(lo: float, hi: float, n: int = 5) -> tuple[np.ndarray, int]:
    """About ``n`` round ticks (steps of 1, 2, 2.5 or 5 times a power of ten) in ``[lo, hi]``; their decimals."""
    mag = 10.0 ** math.floor(math.log10((hi - lo) / max(n - 1, 1)))

    def count(step: float) -> int:
        return math.floor(hi / step + 1e-9) - math.ceil(lo / step - 1e-9) + 1

    m = min((10.0, 5.0, 2.5, 2.0, 1.0), key=lambda m: abs(count(m * mag) - n))  # ties: the larger step
    step = m * mag
    ticks = np.arange(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1) * step
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    decimals += 0 if abs(step * 10 ** decimals - round(step * 10 ** decimals)) < 1e-6 else 1  # 0.25, 2.5
    return ticks, decimals


def _padded_range(v: np.ndarray) -> tuple[float, float]:
    """The finite values' range with 5 % margins (a constant gets +-5 % of itself, or +-1)."""
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = float(v.min()), float(v.max())
    pad = 0.05 * (hi - lo) if hi > lo else (0.05 * abs(lo) or 1.0)
    return lo - pad, hi + pad


def _svg_text(x: float, y: float, text: str, *, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{html.escape(text)}</text>'


def _panel(x: np.ndarray, y: np.ndarray, used: np.ndarray, label: str, xr: tuple[float, float], box) -> list[str]:
    """One plot of the time figure: frame, grid, tick labels, the used frames' curve, the skipped frames."""
    left, top, width, height = box
    yr = _padded_range(y)
    px = lambda v: left + (v - xr[0]) / (xr[1] - xr[0]) * width  # noqa: E731
    py = lambda v: top + height - (v - yr[0]) / (yr[1] - yr[0]) * height  # noqa: E731
    out = [f'<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#444"/>']
    yt, dec = _ticks(*yr, n=4)
    for t in yt:
        out.append(f'<line x1="{left}" x2="{left + width}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#ddd"/>')
        out.append(_svg_text(left - 4, py(t) + 4, f"{t:.{dec}f}", anchor="end"))
    for t in _ticks(*xr, n=8)[0]:
        out.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top}" y2="{top + height}" stroke="#ddd"/>')
    lx = max(10.0, left - 14 - 6.5 * max(len(f"{t:.{dec}f}") for t in yt))  # clear of the tick labels
    out.append(_svg_text(lx, top + height / 2, label,
                         extra=f' transform="rotate(-90 {lx:.1f} {top + height / 2:.1f})"'))
    run: list[int] = []
    for i in [*np.flatnonzero(used), None]:  # the used frames joined in order; a missing value breaks the curve
        if i is not None and np.isfinite(y[i]):
            run.append(i)
            continue
        if len(run) > 1:
            pts = " ".join(f"{px(x[j]):.1f},{py(y[j]):.1f}" for j in run)
            out.append(f'<polyline points="{pts}" fill="none" stroke="{_USED}" stroke-width="1.5"/>')
        run = []
    for i in np.flatnonzero(np.isfinite(y)):
        style = f'fill="{_USED}"' if used[i] else f'fill="none" stroke="{_SKIPPED}" stroke-width="1.5"'
        out.append(f'<circle cx="{px(x[i]):.1f}" cy="{py(y[i]):.1f}" r="3" {style}/>')
    return out


def time_plots_svg(frames: Sequence[dict[str, Any]]) -> str:
    """Inline SVG: FWHM, stars, background, weight and residual against time; skipped frames hollow red."""
    x, xlabel = _times(frames)
    used = np.array([bool(f.get("used")) for f in frames])
    width, left, panel_h, gap, top = 675, 80, 120, 22, 10
    xr = _padded_range(x)
    parts = []
    for k, (key, label) in enumerate(TIME_PLOTS):
        y = np.array([np.nan if f.get(key) is None else float(f[key]) for f in frames])
        parts += _panel(x, y, used, label, xr, (left, top + k * (panel_h + gap), width - left - 15, panel_h))
    bottom = top + len(TIME_PLOTS) * (panel_h + gap) - gap
    xt, dec = _ticks(*xr, n=8)
    for t in xt:
        parts.append(_svg_text(left + (t - xr[0]) / (xr[1] - xr[0]) * (width - left - 15), bottom + 15,
                               f"{t:.{dec}f}"))
    parts.append(_svg_text(left + (width - left - 15) / 2, bottom + 34, xlabel))
    # legend in the first panel's top right corner
    lx, ly = width - 120, top + 8
    parts.append(f'<rect x="{lx}" y="{ly}" width="100" height="{38 if (~used).any() else 22}" fill="#fff" '
                 'fill-opacity="0.85" stroke="#ccc"/>')
    parts.append(f'<line x1="{lx + 8}" x2="{lx + 28}" y1="{ly + 11}" y2="{ly + 11}" stroke="{_USED}" '
                 f'stroke-width="1.5"/><circle cx="{lx + 18}" cy="{ly + 11}" r="3" fill="{_USED}"/>')
    parts.append(_svg_text(lx + 36, ly + 15, "used", anchor="start"))
    if (~used).any():
        parts.append(f'<circle cx="{lx + 18}" cy="{ly + 27}" r="3" fill="none" stroke="{_SKIPPED}" '
                     'stroke-width="1.5"/>')
        parts.append(_svg_text(lx + 36, ly + 31, "skipped", anchor="start"))
    h = bottom + 45
    return (f'<svg id="time-plots" role="img" aria-label="FWHM, stars, background, weight and residual against '
            f'time" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {h}" width="{width}" height="{h}" '
            f'font-family="system-ui,sans-serif" font-size="11">{"".join(parts)}</svg>')


def map_html(data: np.ndarray, title: str, label: str, img_id: str) -> str:
    """An integer map (coverage, rejections) in viridis as an inline PNG, its title and a colour bar."""
    from PIL import Image

    a = np.asarray(data, dtype=np.float32)
    step = max(1, int(np.ceil(max(a.shape) / 800)))
    a = a[::step, ::step]
    fin = np.isfinite(a)
    lo, hi = (float(a[fin].min()), float(a[fin].max())) if fin.any() else (0.0, 1.0)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    idx = np.clip(np.rint((np.where(fin, a, lo) - lo) * scale), 0, 255).astype(np.uint8)
    rgb = _viridis_lut()[idx]
    rgb[~fin] = 255
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", compress_level=1)
    return (f'<figure class="map"><figcaption>{html.escape(title)}</figcaption>'
            f'<img id="{img_id}" alt="{html.escape(title)}" src="{_png_uri(buf.getvalue())}">'
            f"{_colour_bar(lo, hi, label, img_id + '-scale')}</figure>")


def _colour_bar(lo: float, hi: float, label: str, gid: str) -> str:
    """A horizontal SVG colour bar from ``lo`` to ``hi`` with round ticks and ``label``."""
    width, left, bar = 420, 20, 380
    stops = _VIRIDIS.split()
    grad = "".join(f'<stop offset="{i / (len(stops) - 1):.4f}" stop-color="#{c}"/>' for i, c in enumerate(stops))
    parts = [f'<defs><linearGradient id="{gid}">{grad}</linearGradient></defs>',
             f'<rect x="{left}" y="4" width="{bar}" height="16" fill="url(#{gid})" stroke="#444"/>']
    span = hi - lo if hi > lo else 1.0
    ticks, dec = _ticks(lo, hi if hi > lo else lo + 1.0, n=6)
    for t in ticks:
        tx = left + (t - lo) / span * bar
        parts.append(f'<line x1="{tx:.1f}" x2="{tx:.1f}" y1="20" y2="24" stroke="#444"/>')
        parts.append(_svg_text(tx, 36, f"{t:.{dec}f}"))
    parts.append(_svg_text(left + bar / 2, 52, label))
    return (f'<svg class="colourbar" role="img" aria-label="colour scale: {html.escape(label)}" '
            f'xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} 58" width="{width}" height="58" '
            f'font-family="system-ui,sans-serif" font-size="11">{"".join(parts)}</svg>')


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return '<td data-v="">–</td>'
    try:
        text = fmt.format(value)
    except (ValueError, TypeError):
        text = str(value)
    return f'<td data-v="{html.escape(str(value))}">{html.escape(text)}</td>'


def frame_table(frames: Sequence[dict[str, Any]]) -> str:
    """The sortable per-frame table (click a column title to sort)."""
    head = ('<tr><th>#</th><th class="l">file</th><th class="l">time</th><th class="l">used / why not</th>'
            + "".join(f"<th>{html.escape(t)}</th>" for t, _, _ in FRAME_COLUMNS) + "</tr>")
    rows = []
    for n, f in enumerate(frames):
        f = dict(f)
        if f.get("rejected_fraction") is not None:
            f["rejected_pct"] = 100.0 * float(f["rejected_fraction"])
        status = "used" if f.get("used") else (f.get("reason") or "not used")
        cells = [f'<td data-v="{n}">{n + 1}</td>',
                 f'<td class="l" data-v="{html.escape(Path(f["path"]).name)}">{html.escape(Path(f["path"]).name)}</td>',
                 f'<td class="l" data-v="{html.escape(f.get("timestamp") or "")}">'
                 f'{html.escape(f.get("timestamp") or "–")}</td>',
                 f'<td class="l" data-v="{html.escape(status)}">{html.escape(status)}</td>']
        cells += [_cell(f.get(k), fmt) for _, k, fmt in FRAME_COLUMNS]
        rows.append(f'<tr class="{"used" if f.get("used") else "skip"}">' + "".join(cells) + "</tr>")
    return (f'<table class="sortable" id="frames"><thead>{head}</thead><tbody>' + "".join(rows)
            + "</tbody></table>")


def _kv_table(items: dict[str, Any]) -> str:
    rows = "".join(f'<tr><td>{html.escape(str(k))}</td><td class="l">{html.escape(_fmt(v))}</td></tr>'
                   for k, v in items.items())
    return f'<table class="kv">{rows}</table>'


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def render_report(report: dict[str, Any], *, preview: str | None, coverage: np.ndarray | None,
                  rejections: np.ndarray | None) -> str:
    """The HTML page of one stack.

    Parameters
    ----------
    report : dict
        :func:`skystack.engine.report.build_report`'s dict.
    preview : str or None
        Inline preview URI (:func:`preview_uri`).
    coverage, rejections : ndarray or None
        Frames covering each pixel, and values rejected per pixel.
    """
    frames = report.get("frames", [])
    title = f"skystack report – {Path(report.get('outputs', {}).get('tiff', 'stack')).name}"
    summary = {
        "frames used": f"{report.get('frames_used')} / {report.get('frames_in')}",
        "total exposure": f"{report.get('total_exposure_s') or 0:.0f} s",
        "reference": Path(report["reference"]).name if report.get("reference") else None,
        "backend": f"{report.get('backend')} ({report.get('device')})",
        "output shape": " x ".join(map(str, report.get("output_shape", []))),
        "created": report.get("created"), "run id": report.get("run_id"),
        "software": report.get("software"),
    }
    mem = report.get("memory", {})
    peak = mem.get("peak_rss_bytes")
    timings = {k: f"{v:.2f} s" for k, v in (report.get("timings_s") or {}).items()}
    timings["peak memory"] = f"{peak / 2**20:.0f} MiB" if peak else None
    where = mem.get("frame_store") or ("disk" if mem.get("store_on_disk") else "RAM")
    size = mem.get("frame_store_bytes")
    timings["frame store"] = ({"disk": "disk spill", "device": "device memory"}.get(where, where)
                              + (f", {size / 2**20:.0f} MiB" if size else ""))
    masters = {k: ", ".join(f"{a}={_fmt(b)}" for a, b in v.items() if a in ("count", "method", "exposure_s",
                                                                                "temperature_c", "path"))
               for k, v in (report.get("masters") or {}).items()} or {"masters": "none (uncalibrated)"}
    parts = [f"<h1>{html.escape(title)}</h1>", '<div class="grid">']
    if preview:
        parts.append(f'<div><h2>Preview</h2><img id="preview" alt="stretched preview" src="{preview}"></div>')
    parts.append(f"<div><h2>Summary</h2>{_kv_table(summary)}<h2>Outputs</h2>"
                 f"{_kv_table(report.get('outputs', {}))}</div></div>")
    parts.append(f"<h2>Frames against time</h2>{time_plots_svg(frames)}" if frames else "")
    parts.append('<div class="grid">')
    if coverage is not None:
        parts.append("<div><h2>Coverage</h2>" + map_html(coverage, "frames covering each pixel", "frames", "coverage")
                     + "</div>")
    if rejections is not None:
        parts.append("<div><h2>Rejections</h2>" + map_html(rejections, "values rejected per pixel (first channel)",
                                                              "rejected", "rejections") + "</div>")
    parts.append("</div>")
    if report.get("notes"):
        parts.append('<h2>Notes</h2><ul id="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in report["notes"])
                     + "</ul>")
    parts.append(f"<h2>Frames</h2><p>Click a column title to sort.</p>{frame_table(frames)}")
    parts.append('<div class="grid">'
                 f"<div><h2>Settings</h2>{_kv_table(report.get('settings', {}))}</div>"
                 f"<div><h2>Calibration masters</h2>{_kv_table(masters)}"
                 f"<h2>Stage timings and memory</h2>{_kv_table(timings)}</div></div>")
    return _page(title, "".join(parts))


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}<script>{_SORT_JS}</script></body></html>\n")


def render_index(rows: Sequence[dict[str, Any]], *, title: str = "skystack batch") -> str:
    """The batch's index page: one row per session, linking its report.

    Each row holds ``session``, ``status``, ``frames_used``, ``frames_in``,
    ``total_exposure_s``, ``fwhm_px``, ``noise``, ``note`` and ``report``
    (a path relative to the index, or None).
    """
    head = ('<tr><th class="l">session</th><th class="l">status</th><th>frames</th><th>exposure s</th>'
            "<th>FWHM px</th><th>noise</th><th class=\"l\">note</th></tr>")
    body = []
    for r in rows:
        name = html.escape(str(r.get("session")))
        link = f'<a href="{html.escape(str(r["report"]))}">{name}</a>' if r.get("report") else name
        frames = f"{r.get('frames_used') or 0} / {r.get('frames_in') or 0}"
        body.append(f'<tr><td class="l" data-v="{name}">{link}</td>'
                    f'<td class="l" data-v="{html.escape(str(r.get("status")))}">{html.escape(str(r.get("status")))}</td>'
                    f'<td data-v="{r.get("frames_used") or 0}">{frames}</td>'
                    + _cell(r.get("total_exposure_s"), "{:.0f}") + _cell(r.get("fwhm_px"), "{:.2f}")
                    + _cell(r.get("noise"), "{:.5f}")
                    + f'<td class="l" data-v="{html.escape(str(r.get("note") or ""))}">'
                      f'{html.escape(str(r.get("note") or ""))}</td></tr>')
    table = f'<table class="sortable" id="sessions"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>'
    return _page(title, f"<h1>{html.escape(title)}</h1>{table}")

"""The stack's HTML report (``OUT.html``) and the batch's index page.

One self-contained file that opens from disk: the preview and the matplotlib
plots are inline PNG (``data:`` URIs), the per-frame table sorts with a few
lines of inline JavaScript, nothing is fetched.
"""

from __future__ import annotations

import base64
import html
import io
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
img{max-width:100%;height:auto;border:1px solid #ddd}
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


def _figure_uri(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return _png_uri(buf.getvalue())


def preview_uri(stretched: np.ndarray, *, max_side: int = 1200) -> str:
    """The stretched preview as an inline PNG, at most ``max_side`` pixels on its longer side."""
    from PIL import Image

    from skystack.engine.stretch import to_8bit

    img = Image.fromarray(to_8bit(stretched))
    img.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return _png_uri(buf.getvalue())


def _times(frames: Sequence[dict[str, Any]]) -> tuple[np.ndarray, str]:
    """Minutes since the first frame, or the frame index when the frames carry no time."""
    from skystack.engine.report import _utc

    ts = [_utc(f.get("timestamp")) for f in frames]
    if ts and all(t is not None for t in ts):
        t0 = min(ts)
        return np.array([(t - t0).total_seconds() / 60.0 for t in ts]), "minutes since the first light"
    return np.arange(len(frames), dtype=float), "frame number"


def time_plots_uri(frames: Sequence[dict[str, Any]]) -> str:
    """One figure: FWHM, stars, background, weight and residual against time; skipped frames hollow."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    x, xlabel = _times(frames)
    used = np.array([bool(f.get("used")) for f in frames])
    fig, axes = plt.subplots(len(TIME_PLOTS), 1, figsize=(7.5, 8.5), sharex=True, layout="constrained")
    for ax, (key, label) in zip(axes, TIME_PLOTS):
        y = np.array([np.nan if f.get(key) is None else float(f[key]) for f in frames])
        ax.plot(x[used], y[used], "o-", color="C0", ms=4, lw=1.2, label="used")
        if (~used).any():
            ax.plot(x[~used], y[~used], "o", mfc="none", color="C3", ms=5, label="skipped")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="best", fontsize=8)
    axes[-1].set_xlabel(xlabel)
    return _figure_uri(fig)


def map_uri(data: np.ndarray, title: str, label: str) -> str:
    """An integer map (coverage, rejections) with a colour bar."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    a = np.asarray(data, dtype=np.float32)
    step = max(1, int(np.ceil(max(a.shape) / 800)))
    a = a[::step, ::step]
    fig, ax = plt.subplots(figsize=(6.0, 6.0 * a.shape[0] / max(a.shape[1], 1) + 0.6), layout="constrained")
    im = ax.imshow(a, cmap="viridis", interpolation="nearest")
    ax.set_title(title)
    ax.set_axis_off()
    fig.colorbar(im, ax=ax, label=label, shrink=0.8)
    return _figure_uri(fig)


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
    timings["frame store"] = "disk spill" if mem.get("store_on_disk") else "RAM"
    masters = {k: ", ".join(f"{a}={_fmt(b)}" for a, b in v.items() if a in ("count", "method", "exposure_s",
                                                                                "temperature_c", "path"))
               for k, v in (report.get("masters") or {}).items()} or {"masters": "none (uncalibrated)"}
    parts = [f"<h1>{html.escape(title)}</h1>", '<div class="grid">']
    if preview:
        parts.append(f'<div><h2>Preview</h2><img id="preview" alt="stretched preview" src="{preview}"></div>')
    parts.append(f"<div><h2>Summary</h2>{_kv_table(summary)}<h2>Outputs</h2>"
                 f"{_kv_table(report.get('outputs', {}))}</div></div>")
    parts.append(f'<h2>Frames against time</h2><img id="time-plots" alt="FWHM, stars, background, weight and '
                 f'residual against time" src="{time_plots_uri(frames)}">' if frames else "")
    parts.append('<div class="grid">')
    if coverage is not None:
        parts.append('<div><h2>Coverage</h2><img id="coverage" alt="coverage map" src="'
                     + map_uri(coverage, "frames covering each pixel", "frames") + '"></div>')
    if rejections is not None:
        parts.append('<div><h2>Rejections</h2><img id="rejections" alt="rejection-count map" src="'
                     + map_uri(rejections, "values rejected per pixel (first channel)", "rejected") + '"></div>')
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

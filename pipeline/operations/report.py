"""Report: one self-contained HTML file (inline SVG, no scripts, no server) describing a version:
explained variance and k per module, the error distribution over adapters, the compression ratio,
the quarantined adapters with their reasons, and the store's version history."""

from __future__ import annotations

import datetime as dt
import html

import numpy as np

from pipeline import __version__
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.operations.history import list_versions
from pipeline.operations.info import describe

WIDTH, HEIGHT, PAD = 720, 220, 36
COLOURS = ("#3b6ea8", "#d08c2c")


def write_report(store: Store, version: str | None, out: Location) -> str:
    info = describe(store, version)
    out.write_atomic(render(info, list_versions(store)).encode())
    return info["version"]


def render(info: dict, history: list[dict]) -> str:
    modules = sorted(info["k"])
    errors = np.array([e["mean"] for e in info["per_adapter_error"].values()])
    esc = html.escape
    sections = [
        f"<h1>lora-subspace report: {esc(info['store'])} {esc(info['version'])}</h1>",
        "<table class=facts>"
        + "".join(
            f"<tr><th>{esc(k)}</th><td>{esc(str(v))}</td></tr>"
            for k, v in (
                (
                    "version",
                    f"{info['version']} ({info['operation']}){' current' if info['current'] else ''}, "
                    f"parent {info['parent'] or '-'}",
                ),
                ("created", info["created"]),
                (
                    "adapters",
                    f"{info['adapters']['ok']} ok, "
                    f"{info['adapters'].get('in_basis', info['adapters']['ok'])} in the basis, "
                    f"{info['adapters']['quarantined']} quarantined",
                ),
                ("modules", len(modules)),
                (
                    "compression",
                    f"{info['original_bytes']:,} bytes of adapters -> {info['store_bytes']:,} bytes stored "
                    f"({info['compression_ratio']:.1f}x)",
                ),
                (
                    "delta-W error",
                    f"mean {info['error']['mean']:.4f}, max {info['error']['max']:.4f} "
                    "(relative, per adapter mean over modules)",
                ),
            )
        )
        + "</table>",
        "<h2>Explained variance per module</h2>",
        _bars(
            modules,
            [[info["explained_variance"][m][0] for m in modules], [info["explained_variance"][m][1] for m in modules]],
            ("lora_A", "lora_B"),
            top=1.0,
        ),
        "<h2>Components (k) per module</h2>",
        _bars(modules, [[info["k"][m][0] for m in modules], [info["k"][m][1] for m in modules]], ("k_a", "k_b")),
        "<h2>Reconstruction error over adapters</h2>",
        _histogram(errors, "relative delta-W error (mean over modules)"),
        "<p>Worst: " + ", ".join(esc(t) for t in info["error"]["worst"]) + "</p>",
        "<h2>Quarantined adapters</h2>",
        _table(("task id", "reason"), sorted(info["quarantined"].items())) if info["quarantined"] else "<p>None.</p>",
        "<h2>Version history</h2>",
        _bars([r["version"] for r in history], [[r["error"].get("mean", 0.0) for r in history]], ("mean error",)),
        _table(
            ("version", "created", "operation", "parent", "adapters", "quarantined", "bases", "mean error"),
            [
                (
                    r["version"] + (" *" if r["current"] else ""),
                    r["created"],
                    r["operation"],
                    r["parent"] or "-",
                    r["adapters"]["ok"],
                    r["adapters"]["quarantined"],
                    r["bases"],
                    f"{r['error'].get('mean', float('nan')):.4f}",
                )
                for r in history
            ],
        ),
        f"<p class=foot>lora-subspace {__version__}, "
        f"{dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}</p>",
    ]
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>lora-subspace report</title><style>"
        "body{font-family:sans-serif;max-width:780px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:90%}.facts th{background:#f4f4f4}"
        "svg{background:#fafafa;border:1px solid #ddd}.foot{color:#888;font-size:80%}"
        "</style></head><body>" + "\n".join(sections) + "</body></html>\n"
    )


def _bars(labels: list[str], series: list[list[float]], names: tuple[str, ...], top: float | None = None) -> str:
    """Grouped vertical bars, one group per label; hover a bar for its label and value."""
    top = top or max((v for s in series for v in s), default=1.0) or 1.0
    group = (WIDTH - 2 * PAD) / max(len(labels), 1)
    bar = group / (len(series) + 0.5)
    parts = [_axes(top)]
    for i, label in enumerate(labels):
        for j, values in enumerate(series):
            h = (HEIGHT - 2 * PAD) * values[i] / top
            x, y = PAD + i * group + j * bar, HEIGHT - PAD - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar - 0.5, 0.5):.1f}" height="{h:.1f}" '
                f'fill="{COLOURS[j % 2]}">'
                f"<title>{html.escape(label)} {names[j]}: {values[i]:.4g}</title></rect>"
            )
    if len(labels) <= 12:
        parts += [
            f'<text x="{PAD + (i + 0.5) * group:.1f}" y="{HEIGHT - PAD + 14}" font-size="9" text-anchor="middle">'
            f"{html.escape(label[-18:])}</text>"
            for i, label in enumerate(labels)
        ]
    parts += [
        f'<text x="{WIDTH - PAD - 60 * (len(names) - j)}" y="14" font-size="11" fill="{COLOURS[j % 2]}">{n}</text>'
        for j, n in enumerate(names)
    ]
    return _svg(parts)


def _histogram(values: np.ndarray, xlabel: str, bins: int = 24) -> str:
    if not len(values):
        return "<p>No adapters.</p>"
    counts, edges = np.histogram(values, bins=bins)
    top = max(int(counts.max()), 1)
    width = (WIDTH - 2 * PAD) / bins
    parts = [_axes(top)]
    for i, count in enumerate(counts):
        h = (HEIGHT - 2 * PAD) * count / top
        parts.append(
            f'<rect x="{PAD + i * width:.1f}" y="{HEIGHT - PAD - h:.1f}" width="{width - 1:.1f}" height="{h:.1f}" '
            f'fill="{COLOURS[0]}"><title>{edges[i]:.4f}..{edges[i + 1]:.4f}: {count} adapter(s)</title></rect>'
        )
    parts += [
        f'<text x="{PAD}" y="{HEIGHT - PAD + 14}" font-size="10">{edges[0]:.4f}</text>',
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 14}" font-size="10" text-anchor="end">{edges[-1]:.4f}</text>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" font-size="11" text-anchor="middle">{html.escape(xlabel)}</text>',
    ]
    return _svg(parts)


def _axes(top: float) -> str:
    return (
        f'<line x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>'
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{HEIGHT - PAD}" stroke="#999"/>'
        f'<text x="{PAD - 4}" y="{PAD + 4}" font-size="10" text-anchor="end">{top:.3g}</text>'
        f'<text x="{PAD - 4}" y="{HEIGHT - PAD}" font-size="10" text-anchor="end">0</text>'
    )


def _svg(parts: list[str]) -> str:
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}">'
        + "".join(parts)
        + "</svg>"
    )


def _table(header: tuple[str, ...], rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"

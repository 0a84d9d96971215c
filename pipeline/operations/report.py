"""Report: one self-contained HTML file (inline SVG, no scripts, no server) describing a version:
per module its method, bases, explained variance and error over adapters; per adapter the error
distribution and the worst adapters by name, and those with residuals with their errors with and
without them; the compression ratio, the quarantined adapters with their reasons, and the store's
version history. Every name read from the store (task ids, module
names, reasons) is escaped."""

from __future__ import annotations

import datetime as dt
import html
import math
import re

import numpy as np

from pipeline import __version__
from pipeline.io.format import split_group
from pipeline.io.location import Location
from pipeline.io.store import Store
from pipeline.operations.history import list_versions
from pipeline.operations.info import describe, distribution_line, methods_line, residuals_line

WIDTH, HEIGHT, PAD = 720, 220, 36
CHAR_WIDTH = 5.5  # pixels of a 9px sans-serif character, to space the axis labels
PALETTES = {"": ("#3b6ea8", "#d08c2c"), "flat": ("#3b6ea8", "#d08c2c"), "joint": ("#4e9a5b", "#9b4f96")}
BASES = {"flat": ("k_a", "k_b"), "joint": ("c", "q")}
ERROR_COLUMNS = ("mean", "max", "shared_mean", "shared_max")  # with residuals, then the shared bases alone
esc = html.escape


def write_report(store: Store, version: str | None, out: Location) -> str:
    info = describe(store, version)
    out.write_atomic(render(info, list_versions(store)).encode())
    return info["version"]


def render(info: dict, history: list[dict]) -> str:
    sections = [
        f"<h1>lora-subspace report: {esc(info['store'])} {esc(info['version'])}</h1>",
        _facts_table(_facts(info)),
        *_module_sections(info),
        *_adapter_sections(info),
        *_history_sections(history),
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


def _facts(info: dict) -> list[tuple[str, str]]:
    """The version at a glance, one (name, text) row each."""
    adapters = info["adapters"]
    return [
        (
            "version",
            f"{info['version']} ({info['operation']}){' current' if info['current'] else ''}, "
            f"parent {info['parent'] or '-'}",
        ),
        ("created", info["created"]),
        (
            "adapters",
            f"{adapters['ok']} ok, {adapters.get('in_basis', adapters['ok'])} in the basis, "
            f"{adapters['quarantined']} quarantined",
        ),
        ("modules", f"{info['modules']}: {methods_line(info['methods'])}"),
        (
            "compression",
            f"{info['original_bytes']:,} bytes of adapters -> {info['store_bytes']:,} bytes stored "
            f"({info['compression_ratio']:.1f}x)",
        ),
        (
            "delta-W error",
            f"mean {info['error']['mean']:.4f}, max {info['error']['max']:.4f} "
            "(relative, per adapter mean over modules; max over modules)",
        ),
        ("per adapter", distribution_line(info)),
        *([("residuals", residuals_line(info))] if info.get("max_error") is not None or info.get("residuals") else []),
    ]


def _module_sections(info: dict) -> list[str]:
    """Charts per module (explained variance, bases, error over adapters) and a table of them all."""
    modules = sorted(info["methods"], key=_natural)
    methods = [info["methods"][m]["method"] for m in modules]
    explained, errors = info["explained_variance"], info["module_error"]
    bases = [_bases(info["methods"][m]) for m in modules]
    names = {m: BASES[m] for m in BASES if m in methods}
    return [
        "<h2>Explained variance per module</h2>",
        "<p>Flat modules: the fraction of each factor's centred variance kept; joint modules: the "
        "fraction of the collection's delta-W energy kept (both bars).</p>",
        _bars(modules, [[explained[m][0] for m in modules], [explained[m][1] for m in modules]], ("A", "B"), top=1.0),
        "<h2>Bases per module</h2>",
        "<p>Flat modules: components k of lora_A and lora_B; joint modules: width c and core rank q.</p>",
        _bars(modules, [[b[0] for b in bases], [b[1] for b in bases]], names, kinds=methods),
        "<h2>Error per module over adapters</h2>",
        _bars(modules, [[errors[m]["mean"] for m in modules], [errors[m]["max"] for m in modules]], ("mean", "max")),
        _module_table(info, modules),
    ]


def _module_table(info: dict, modules: list[str]) -> str:
    """Every module by full name: method, bases, explained variance, error over adapters."""
    rows = []
    for m in modules:
        choice, explained, error = info["methods"][m], info["explained_variance"][m], info["module_error"][m]
        rows.append(
            (
                m,
                choice["method"],
                ", ".join(f"{n} {v}" for n, v in zip(BASES[choice["method"]], _bases(choice))),
                f"{explained[0]:.3f}, {explained[1]:.3f}",
                f"{error['mean']:.4f}",
                f"{error['max']:.4f}",
            )
        )
    header = ("module", "method", "bases", "explained A, B", "error mean", "error max")
    return f"<details><summary>All {len(modules)} modules</summary>{_table(header, rows)}</details>"


def _adapter_sections(info: dict) -> list[str]:
    """The error distribution over adapters, the worst adapters by name, the quarantined ones."""
    errors = np.array([e["mean"] for e in info["per_adapter_error"].values()])
    d = info["error_distribution"]
    quarantined = info["quarantined"]
    return [
        "<h2>Reconstruction error over adapters</h2>",
        _histogram(errors, "relative delta-W error (mean over modules)", {q: d[q] for q in ("p50", "p90", "p99")}),
        f"<p>{esc(distribution_line(info))}</p>",
        f"<h2>Worst {len(info['worst_adapters'])} adapters</h2>",
        _table(
            ("task id", "error mean", "error max"),
            [(w["task_id"], f"{w['mean']:.4f}", f"{w['max']:.4f}") for w in info["worst_adapters"]],
        ),
        *_residual_sections(info),
        f"<h2>Quarantined adapters ({len(quarantined)})</h2>",
        _table(("task id", "reason"), sorted(quarantined.items())) if quarantined else "<p>None.</p>",
    ]


def _residual_sections(info: dict) -> list[str]:
    """The adapters with residuals the shared bases alone serve worst, with their errors with
    and without their residuals (none without residuals)."""
    worst = info.get("worst_residual_adapters") or []
    if not worst:
        return []
    return [
        f"<h2>Adapters with residuals ({len(info['residual_adapters'])}): the worst {len(worst)} without them</h2>",
        _table(
            ("task id", "modules with residuals", "residual bytes", "error mean", "error max", "without: mean", "max"),
            [(w["task_id"], w["modules"], f"{w['bytes']:,}", *(f"{w[k]:.4f}" for k in ERROR_COLUMNS)) for w in worst],
        ),
    ]


def _history_sections(history: list[dict]) -> list[str]:
    return [
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
    ]


def _bases(choice: dict) -> tuple[int, int]:
    """(k_a, k_b) of a flat module, (c, q) of a joint one."""
    return tuple(choice["k"]) if choice["method"] == "flat" else (choice["width"], choice["core_rank"])


def _natural(name: str) -> list:
    """Sort key putting layer 2 before layer 10."""
    return [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in re.split(r"(\d+)", name)]


def module_label(name: str, chars: int) -> str:
    """A module's name in at most `chars` characters, keeping its layer number (its first numeric
    part): 'model.layers.12.self_attn.q_proj' reads '12.self_attn.q_proj', or '12.q_proj' when
    that is too long, or '12.q_pr' at the least. A name without one keeps its end. A group's module
    keeps its group: 'g1/model.layers.12.self_attn.q_proj' reads 'g1/12.q_proj'."""
    group, name = split_group(name)
    if group is not None:
        prefix = f"g{group}/"
        return prefix + module_label(name, max(chars - len(prefix), 1))
    parts = name.split(".")
    layer = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    if layer is None or layer == len(parts) - 1:
        return name[-chars:]
    for start in range(layer + 1, len(parts)):
        label = ".".join([parts[layer], *parts[start:]])
        if len(label) <= chars:
            return label
    return f"{parts[layer]}.{parts[-1][: max(chars - len(parts[layer]) - 1, 1)]}"


def _bars(
    labels: list[str],
    series: list[list[float]],
    names: tuple[str, ...] | dict[str, tuple[str, ...]],
    top: float | None = None,
    kinds: list[str] | None = None,
) -> str:
    """Grouped vertical bars, one group per label; hover a bar for its label and value. `names`
    are the series' names, or per kind (a module's method) when `kinds` gives each label's kind:
    a kind's bars have their own colours and names."""
    names = names if isinstance(names, dict) else {"": names}
    kinds = kinds or [""] * len(labels)
    top = top or max((v for s in series for v in s), default=1.0) or 1.0
    group = (WIDTH - 2 * PAD) / max(len(labels), 1)
    bar = group / (len(series) + 0.5)
    parts = [_axes(top)]
    for i, (label, kind) in enumerate(zip(labels, kinds)):
        for j, values in enumerate(series):
            h = (HEIGHT - 2 * PAD) * values[i] / top
            x, y = PAD + i * group + j * bar, HEIGHT - PAD - h
            parts.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(bar - 0.5, 0.5):.1f}" height="{h:.1f}" '
                f'fill="{PALETTES[kind][j % 2]}">'
                f"<title>{esc(label)} {esc(names[kind][j])}: {values[i]:.4g}</title></rect>"
            )
    return _svg(parts + _ticks(labels, group) + _legend(names))


def _ticks(labels: list[str], group: float) -> list[str]:
    """Labels under the bars: every step-th label, room for 10 characters each at least; module
    names shortened to keep their layer number."""
    step = max(1, math.ceil(10 * CHAR_WIDTH / group))
    chars = max(int(step * group / CHAR_WIDTH) - 1, 1)
    return [
        f'<text x="{PAD + (i + 0.5) * group:.1f}" y="{HEIGHT - PAD + 14}" font-size="9" text-anchor="middle">'
        f"{esc(module_label(labels[i], chars))}</text>"
        for i in range(0, len(labels), step)
    ]


def _legend(names: dict[str, tuple[str, ...]]) -> list[str]:
    entries = [
        (f"{n} ({kind})" if len(names) > 1 else n, PALETTES[kind][j % 2])
        for kind, series in names.items()
        for j, n in enumerate(series)
    ]
    parts, x = [], WIDTH - PAD
    for text, colour in reversed(entries):
        x -= 7 * len(text) + 12
        parts.append(f'<text x="{x}" y="14" font-size="11" fill="{colour}">{esc(text)}</text>')
    return parts


def _histogram(values: np.ndarray, xlabel: str, marks: dict[str, float], bins: int = 24) -> str:
    """Counts of values in equal bins, with a dashed line at each mark (e.g. p90)."""
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
            f'fill="{PALETTES[""][0]}"><title>{edges[i]:.4f}..{edges[i + 1]:.4f}: {count} adapter(s)</title></rect>'
        )
    span = max(edges[-1] - edges[0], 1e-300)
    for name, value in marks.items():
        x = PAD + (WIDTH - 2 * PAD) * (value - edges[0]) / span
        parts.append(
            f'<line x1="{x:.1f}" y1="{PAD}" x2="{x:.1f}" y2="{HEIGHT - PAD}" stroke="#888" stroke-dasharray="3,3">'
            f"<title>{name} {value:.4f}</title></line>"
            f'<text x="{x + 2:.1f}" y="{PAD - 4}" font-size="9">{name}</text>'
        )
    parts += [
        f'<text x="{PAD}" y="{HEIGHT - PAD + 14}" font-size="10">{edges[0]:.4f}</text>',
        f'<text x="{WIDTH - PAD}" y="{HEIGHT - PAD + 14}" font-size="10" text-anchor="end">{edges[-1]:.4f}</text>',
        f'<text x="{WIDTH / 2}" y="{HEIGHT - 6}" font-size="11" text-anchor="middle">{esc(xlabel)}</text>',
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
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _facts_table(rows: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{esc(name)}</th><td>{esc(str(text))}</td></tr>" for name, text in rows)
    return f"<table class=facts>{body}</table>"

"""What the benchmark's measurements come to: the ratios between them, the targets met or not,
and the table printed at the end of a run. Pure functions of the figures dict run.py builds."""

from __future__ import annotations

from pipeline.benchmark import methods, retention

BF16_EPS = 2.0**-8  # "equal within bf16 rounding": errors agree to bf16's relative precision


def ratios_and_targets(f: dict) -> tuple[dict, list[dict]]:
    """Every ratio (rounded to 6 decimals) and target of the steps the run measured, in step order."""
    ratios, targets = {}, []
    for step in (_floor_figures, _rebase_figures, _export_figures, _methods_figures, _trained_figures, _vlora_figures):
        step_ratios, step_targets = step(f)
        ratios.update(step_ratios)
        targets += step_targets
    return {k: round(v, 6) for k, v in ratios.items()}, targets


def _floor_figures(f: dict) -> tuple[dict, list[dict]]:
    if "floor" not in f:
        return {}, []
    ratio = f["compress"]["seconds"] / f["floor"]["seconds"]
    return {"ours_over_floor": ratio}, [
        _target("end to end within 2x of read + math + Ray-start floors", ratio, "<=", 2.0)
    ]


def _rebase_figures(f: dict) -> tuple[dict, list[dict]]:
    if "rebase" not in f:
        return {}, []
    rebase, full = f["rebase"], f["full_compress"]
    ratios = {
        "rebase_over_full_compress": rebase["seconds"] / full["seconds"],
        "rebase_over_full_compress_job_seconds": rebase["job_seconds"] / full["job_seconds"],
    }
    # On a running cluster a job does not start Ray: compared without process and Ray start.
    target = _target(
        "incremental re-base at most 10% of a full compress (job seconds)",
        ratios["rebase_over_full_compress_job_seconds"],
        "<=",
        0.10,
    )
    return ratios, [target]


def _export_figures(f: dict) -> tuple[dict, list[dict]]:
    one = _target("one-adapter export after start-up, seconds", f["export"]["seconds"], "<", 1.0)
    every = f["export"].get("all")
    if every is None:
        return {}, [one]
    per_second = every["adapters"] / max(every["seconds"], 1e-9)
    return {"export_all_adapters_per_second": per_second}, [
        one,
        _target(
            "export --all, adapters per second end to end (a fresh process, Ray start included)", per_second, ">=", 100
        ),
    ]


def _methods_figures(f: dict) -> tuple[dict, list[dict]]:
    if "methods" not in f:
        return {}, []
    shared, gauge = f["methods"]["shared"], f["methods"]["gauge"]
    best = min(gauge["aligned"]["error"], gauge["joint"]["error"])
    ratios = {
        "gauge_best_over_flat_on_twin": best / max(shared["flat"]["error"], 1e-12),
        "joint_seconds_over_flat": shared["joint"]["seconds"] / max(shared["flat"]["seconds"], 1e-9),
    }
    targets = [
        _target(
            "gauge twin: best invariant method at the flat bytes within 1.5x of flat on the un-rotated twin",
            ratios["gauge_best_over_flat_on_twin"],
            "<=",
            1.5,
        ),
        _target(
            "joint fit (width and rank search included) at most 3x the flat method's compute",
            ratios["joint_seconds_over_flat"],
            "<=",
            3.0,
        ),
    ]
    return ratios, targets


def _trained_figures(f: dict) -> tuple[dict, list[dict]]:
    rows = {row["name"]: row for row in f.get("trained", {}).get("rows", []) if "refused" not in row}
    auto, flat = rows.get(retention.HEADLINE_ROW), rows.get(retention.FLAT_ROW)
    ratios, targets = {}, []
    if auto and flat:
        ratios["trained_auto_error_over_flat"] = auto["error"]["mean"] / max(flat["error"]["mean"], 1e-12)
        targets.append(
            _target(
                f"peft-trained adapters, mixed init seeds: auto's delta-W error at most half the flat method's "
                f"at equal bytes ({retention.HEADLINE_ROW})",
                ratios["trained_auto_error_over_flat"],
                "<=",
                0.5,
            )
        )
    bounded, held = rows.get(retention.BOUND_ROW), rows.get(retention.HELD_BOUND_ROW)
    unbounded = [rows[name] for name in retention.RATIO_10_ROWS if name in rows]
    checks = [
        (
            f"{retention.BOUND_ROW}: every adapter keeps >= {retention.KEEP:g} (minimum retention)",
            bounded,
            lambda r: r["retention"]["min"],
            ">=",
            retention.KEEP,
        ),
        (
            f"{retention.BOUND_ROW}: the store at least 5x smaller than the adapters",
            bounded,
            lambda r: r["ratio_reached"],
            ">=",
            5.0,
        ),
        (
            f"{retention.HELD_BOUND_ROW}: every projected adapter keeps >= {retention.KEEP:g} before the re-base",
            held,
            lambda r: r["projected"]["before_rebase"]["min"],
            ">=",
            retention.KEEP,
        ),
        (
            f"{retention.HELD_BOUND_ROW}: projected adapters keep >= {retention.KEEP:g} on average before the re-base",
            held,
            lambda r: r["projected"]["before_rebase"]["mean"],
            ">=",
            retention.KEEP,
        ),
        (
            "ratio 10 without a bound, best of one basis and groups: minimum retention >= 0.95",
            unbounded or None,
            lambda rs: max(r["retention"]["min"] for r in rs),
            ">=",
            0.95,
        ),
    ]
    for name, row, value, op, threshold in checks:
        if row:
            targets.append(_target(f"peft-trained adapters, {name}", value(row), op, threshold))
    return ratios, targets


def _vlora_figures(f: dict) -> tuple[dict, list[dict]]:
    ours, vlora = f["compress"], f.get("vlora", {})
    if "seconds" not in vlora:
        return {}, []
    ratios = {
        "vlora_over_ours": vlora["seconds"] / ours["seconds"],
        "vlora_peak_over_our_largest_process": vlora["peak_rss_mib"] / max(max(ours["peak_rss_mib"].values()), 1),
        "error_ours": ours["error"]["mean"],
        "error_vlora": vlora["error"]["mean"],
    }
    relative = abs(ours["error"]["mean"] - vlora["error"]["mean"]) / max(vlora["error"]["mean"], 1e-12)
    targets = [
        _target("at least 10x faster than vlora load + from_adapters", ratios["vlora_over_ours"], ">=", 10.0),
        _target(
            "every process at most 1/10 of vlora's peak RSS", ratios["vlora_peak_over_our_largest_process"], ">=", 10.0
        ),
        _target("delta-W error equal to vlora's within bf16 rounding (relative)", relative, "<=", BF16_EPS),
    ]
    return ratios, targets


def _target(name: str, value: float, op: str, bound: float) -> dict:
    met = {"<=": value <= bound, "<": value < bound, ">=": value >= bound}[op]
    return {"name": name, "value": round(value, 6), "target": f"{op} {bound:g}", "met": met}


# -- the table -------------------------------------------------------------------------------


def format_table(f: dict) -> str:
    """The run's figures as the lines the job prints: a header, then each measured step's rows,
    what was read and written, and every target."""
    c = f["config"]
    lines = [
        f"benchmark: {c['adapters']} x {c['preset']} ({c['structure']}, {c['dtype']}), k={c['components']}, "
        f"{f['machine']['cpus']} CPUs, {f['collection']['bytes'] / 2**30:.2f} GiB of adapters; "
        f"medians of {c['repeats']}",
        f"{'':44}{'seconds':>9}   peak RSS MiB per process",
    ]
    for step in (
        _compress_rows,
        _floor_rows,
        _rebase_rows,
        _export_rows,
        _quantize_rows,
        _methods_rows,
        _trained_rows,
        _library_rows,
        _vlora_rows,
        _io_rows,
        _target_rows,
    ):
        lines += step(f)
    return "\n".join(lines)


def _row(name: str, seconds: float, peaks: dict | None = None) -> str:
    return f"{name:44}{seconds:>9.2f}   " + ", ".join(f"{k} {v}" for k, v in sorted((peaks or {}).items()))


def _compress_rows(f: dict) -> list[str]:
    ours = f["compress"]
    return [
        _row("compress, end to end", ours["seconds"], ours["peak_rss_mib"]),
        _row("  job (no process or Ray start)", ours["job_seconds"]),
        *(_row(f"    {stage}", seconds) for stage, seconds in ours["stages"].items()),
    ]


def _floor_rows(f: dict) -> list[str]:
    if "floor" not in f:
        return []
    floor = f["floor"]
    return [
        _row("floor: read every file once", floor["read"]["seconds"]),
        _row(f"floor: bare math ({', '.join(floor['math']['routes'])})", floor["math"]["seconds"]),
        _row("floor: Ray start", floor["ray_start"]["seconds"]),
    ]


def _rebase_rows(f: dict) -> list[str]:
    if "rebase" not in f:
        return []
    rebase, full = f["rebase"], f["full_compress"]
    return [
        _row(f"rebase of {f['config']['uploads']} uploads, end to end", rebase["seconds"], rebase["peak_rss_mib"]),
        _row("  job", rebase["job_seconds"]),
        _row(f"full compress of {full['adapters']}, end to end", full["seconds"], full["peak_rss_mib"]),
        _row("  job", full["job_seconds"]),
    ]


def _export_rows(f: dict) -> list[str]:
    every = f["export"].get("all")
    rows = [_row("export one adapter (after start-up)", f["export"]["seconds"])]
    if every is not None:
        rows.append(_row(f"export --all of {every['adapters']}, end to end", every["seconds"], every["peak_rss_mib"]))
    return rows


def _quantize_rows(f: dict) -> list[str]:
    lines = []
    for scheme, q in f.get("quantize", {}).items():
        before, after = q["bytes_before"], q["bytes_after"]
        lines += [
            _row(f"quantize {scheme}, end to end", q["seconds"], q["peak_rss_mib"]),
            f"  store {before['total'] / 2**20:.2f} -> {after['total'] / 2**20:.2f} MiB (components "
            f"{before['components'] / 2**20:.2f} -> {after['components'] / 2**20:.2f}); added delta-W error mean "
            f"{q['added_error']['mean']:.5f}, max {q['added_error']['max']:.5f}",
        ]
    return lines


def _methods_rows(f: dict) -> list[str]:
    if "methods" not in f:
        return []
    c, m = f["config"], f["methods"]
    lines = [f"methods at equal bytes ({c['methods']} adapters, k {c['components']}): delta-W error mean, seconds"]
    for structure in ("shared", "gauge"):
        lines.append(
            f"  {structure:8}"
            + "".join(
                f"  {name} {m[structure][name]['error']:.4f} ({m[structure][name]['seconds']:.1f} s)"
                for name in methods.METHODS
            )
        )
        lines.append(
            f"            joint (c, q) {m[structure]['joint_width_rank']}, auto chose {m[structure]['auto_chose']}"
        )
    return lines


def _trained_rows(f: dict) -> list[str]:
    trained = f.get("trained", {})
    if "rows" not in trained:
        return []
    lines = [
        f"peft-trained adapters ({trained['adapters']}, {len(trained['families'])} task families, half one init "
        f"seed); test accuracy of the originals {trained['original']['accuracy']:.3f}; "
        "retention = exported accuracy / original's"
    ]
    for row in trained["rows"]:
        lines += _trained_row(row)
    bound = trained["error_bound"]
    lines.append(
        f"  every adapter kept >= {bound['keep']:g} up to delta-W error {_maybe(bound['largest_error_all_kept'])}; "
        f"smallest at which one did not: {_maybe(bound['smallest_error_not_kept'])} ({bound['pairs']} pairs)"
    )
    return lines


def _trained_row(row: dict) -> list[str]:
    if "refused" in row:
        return [f"  {row['name']:38} refused: {row['refused']}"]
    kept = row["retention"]
    lines = [
        f"  {row['name']:38} {row['store_bytes']:>11,} B, ratio {row['ratio_reached']:.2f}, delta-W error "
        f"{row['error']['mean']:.4f} (max {row['error']['max']:.4f}), retention {kept['mean']:.3f} "
        f"(min {kept['min']:.3f}, {kept['worst']}), modules {row['methods']}, groups {row.get('groups', 1)}, "
        f"adapters with residuals {row.get('residual_adapters', 0)}"
    ]
    if "projected" in row:
        before, after = row["projected"]["before_rebase"], row["projected"]["after_rebase"]
        lines.append(
            f"    {row['held_out']} projected: retention {before['mean']:.3f} (min {before['min']:.3f}) before rebase, "
            f"{after['mean']:.3f} (min {after['min']:.3f}) after; all after rebase "
            f"{row['after_rebase']['retention']['mean']:.3f} (min {row['after_rebase']['retention']['min']:.3f}), "
            f"{row['after_rebase']['store_bytes']:,} B"
        )
    return lines


def _maybe(value: float | None) -> str:
    return "none" if value is None else f"{value:.4f}"


def _library_rows(f: dict) -> list[str]:
    return [
        _row(f"Subspace build, {mode}", lib["seconds"], {"driver": lib["peak_rss_mib"]})
        for mode, lib in f.get("library", {}).items()
    ]


def _vlora_rows(f: dict) -> list[str]:
    ours, vlora = f["compress"], f.get("vlora")
    if vlora and "seconds" in vlora:
        return [
            _row("vlora load_adapter + from_adapters", vlora["seconds"], {"driver": vlora["peak_rss_mib"]}),
            f"delta-W error mean: ours {ours['error']['mean']:.5f}, vlora {vlora['error']['mean']:.5f}",
        ]
    return [f"vlora: {vlora['skipped']}"] if vlora else []


def _io_rows(f: dict) -> list[str]:
    ours = f["compress"]
    return [
        f"read {ours['bytes_read'] / 2**20:.0f} MiB in {ours['range_requests']} range requests "
        f"({ours['requests_per_adapter']:.1f} per adapter, {ours['shards']} shards); "
        f"wrote {ours['objects_written']} objects, "
        f"{ours['store_bytes'] / 2**20:.1f} MiB; SVD routes {', '.join(ours['svd_routes'])}"
    ] + _chunk_rows(ours.get("chunk_seconds", []))


def _chunk_rows(seconds: list[float]) -> list[str]:
    """Whether a chunk costs the same however many came before it (task seconds, all shards)."""
    if len(seconds) < 2:
        return []
    middle = seconds[1:-1] or seconds[1:]  # the first is a fit, the last may be short
    return [
        f"per chunk, task seconds over all shards: first {seconds[0]:.1f}, then {min(middle):.1f} to "
        f"{max(middle):.1f} (second {seconds[1]:.1f}, last full {middle[-1]:.1f}), last {seconds[-1]:.1f}"
    ]


def _target_rows(f: dict) -> list[str]:
    return [
        f"[{'met' if t['met'] else 'NOT met'}] {t['name']}: {t['value']:g} (target {t['target']})" for t in f["targets"]
    ]

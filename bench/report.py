"""The benchmark report as a markdown table."""

from __future__ import annotations

from typing import Any

COLUMNS = (
    ("mode", "mode", "{}"),
    ("req/s", "rps", "{:,.0f}"),
    ("x direct", "x_direct", "{:.2f}"),
    ("x nginx", "x_nginx", "{:.2f}"),
    ("x plain", "x_plain", "{:.2f}"),
    ("req per CPU-s", "rps_per_core", "{:,.0f}"),
    ("x plain per CPU-s", "x_plain_per_core", "{:.2f}"),
    ("+p50 ms", "p50_added_ms", "{:+.2f}"),
    ("+p90 ms", "p90_added_ms", "{:+.2f}"),
    ("+p99 ms", "p99_added_ms", "{:+.2f}"),
    ("CPU s / 1k req", "cpu_s_per_1k", "{:.3f}"),
    ("of it user", "user_s_per_1k", "{:.3f}"),
    ("cores @ paced", "cores_at_paced", "{:.3f}"),
    ("paced req/s", "paced_rps", "{:,.0f}"),
    ("RSS idle MiB", "idle_rss_mib", "{:.1f}"),
    ("RSS peak MiB", "peak_rss_mib", "{:.1f}"),
    ("RSS held conns MiB", "held_rss_mib", "{:.1f}"),
    ("errors", "errors", "{}"),
)


def markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    params = report["parameters"]
    lines = [
        f"`{report['command']}` — {report['date']} — {machine['cpus']} CPUs "
        f"({machine['cpu_model']}), Linux {machine['kernel']}, Python {machine['python']}, "
        f"load average at start {' '.join(machine['loadavg'])}",
        "",
        f"Median of {params['runs']} rounds; throughput: wrk -t1 -c{params['connections']} "
        f"{params['seconds']} s closed loop; latency: {params['paced_connections']} connections "
        f"paced to ~{params['paced_target_rps']} req/s ({params.get('pacing', 'fixed')} pauses), "
        f"added over direct; RSS held: with "
        f"{params['held_connections']} open client connections.",
        "",
        "| " + " | ".join(title for title, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" if key == "mode" else "---:" for _, key, _ in COLUMNS) + "|",
    ]
    for row in report["modes"]:
        cells = [
            fmt.format(row[key]) if row.get(key) is not None else "" for _, key, fmt in COLUMNS
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [f"\nSkipped: {reason}" for reason in report.get("skipped", [])]
    soak = report.get("soak")
    if soak:
        lines.append(
            f"\nSoak: {soak['service']} {soak['seconds']} s at {soak['rps']:.0f} req/s: RSS "
            f"{soak['rss_before_mib']:.1f} -> {soak['rss_after_mib']:.1f} MiB "
            f"({soak['growth_pct']:+.1f} %), {soak['errors']} errors"
        )
    return "\n".join(lines) + "\n"

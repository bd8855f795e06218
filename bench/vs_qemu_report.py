"""The table of bench/vs_qemu.py: medians and ranges per case and row, the ratios to QEMU, to
trimig's QMP row and to the raw limit, TLS against plaintext, the load average."""

from __future__ import annotations

import os
import statistics
from typing import Any

from vs_qemu_engines import parse_case


def median(samples: list[dict[str, Any]], key: str) -> float | None:
    values = [s[key] for s in samples if isinstance(s.get(key), int | float)]
    values = [v for v in values if v == v]  # not NaN
    return statistics.median(values) if values else None


def spread(samples: list[dict[str, Any]], key: str, scale: float = 1.0, digits: int = 0) -> str:
    values = [s[key] for s in samples if isinstance(s.get(key), int | float)]
    values = [v * scale for v in values if v == v]
    if not values:
        return "-"
    mid = statistics.median(values)
    text = f"{mid:.{digits}f}"
    if len(values) > 1:
        text += f" ({min(values):.{digits}f}-{max(values):.{digits}f})"
    return text


def ratio(top: float | None, bottom: float | None) -> str:
    return f"{top / bottom:.2f}" if top and bottom else "-"


ROW_NAMES = {
    "qemu": "QEMU",
    "trimig": "trimig (QMP)",
    "raw-memfd": "raw, fresh memfd",
    "raw-anon": "raw, fresh anon THP",
    "trimig-cli": "trimig incoming+migrate",
    "trimig-demo": "trimig demo",
}


SUMMARY_KEYS = (
    "throughput_MBps",
    "mbps",
    "total_ms",
    "downtime_ms",
    "pause_ms",
    "postcopy_latency_p50_us",
    "postcopy_latency_p99_us",
    "blocktime_ms",
    "source_all_s_per_gib",
    "destination_all_s_per_gib",
    "source_engine_s_per_gib",
    "destination_engine_s_per_gib",
    "source_own_peak_MiB",
    "destination_own_peak_MiB",
)
HEADER = (
    f"{'':24} {'MB/s':>17} {'Mbit/s':>7} {'total ms':>17} {'downtime':>9} {'pause ms':>15} "
    f"{'p50/p99 us':>10} {'CPU s/GiB':>9} {'engine':>9} {'own MiB':>9} {'/QEMU':>6} {'/QMP':>5} "
    f"{'/raw':>5}"
)
LEGEND = """\
MB/s: ram.transferred / total-time (median, range); Mbit/s: ram.mbps; downtime: as each
engine reports it; pause: source STOP event to destination RESUME event; p50/p99: trimig's
x-postcopy-latency-p50/p99; CPU s/GiB (src/dst, per GiB transferred): with the guest
(QEMU's vCPU thread, trimig's guest process) and without it (engine). own MiB (src/dst):
peak RssAnon+RssFile of the engine process (QEMU's includes its guest RAM; trimig's
budget is 3% of RAM + 64 MiB, bench/engine_memory.py). /QEMU and /raw:
throughput ratios (postcopy: total-time of QEMU / trimig, so above 1 is trimig faster);
/QMP: to trimig's QMP row; /raw: to raw into fresh memfd memory (trimig's kind)."""


def cpu_pair(group: list[dict[str, Any]], part: str) -> str:
    return side_pair(group, f"{{side}}_{part}_s_per_gib", 2)


def side_pair(group: list[dict[str, Any]], key: str, digits: int) -> str:
    """Source/destination medians of ``key`` (``{side}`` in it), "-" where none."""
    values = [median(group, key.format(side=side)) for side in ("source", "destination")]
    if all(value is None for value in values):
        return "-"
    return "/".join(f"{value:.{digits}f}" if value is not None else "-" for value in values)


def versus(
    row: str, other: str, mine: float | None, reference: dict[str, float | None], postcopy: bool
) -> str:
    """The ratio of ``row`` to ``other`` (above 1: ``row`` is better), or "" where none."""
    if row == other or row.startswith("raw") or (other == "trimig" and row == "qemu"):
        return ""
    if postcopy:  # times: lower is better
        return ratio(reference[other], mine)
    return ratio(mine, reference[other])


def summarise(results: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    samples = results["samples"]
    cases = list(dict.fromkeys(s["case"] for s in samples))
    lines: list[str] = [LEGEND]
    summary: dict[str, Any] = {}
    for case in cases:
        lines += ["", case, HEADER]
        by_row: dict[str, list[dict[str, Any]]] = {}
        failed: dict[str, int] = {}
        for sample in samples:
            if sample["case"] == case:
                if sample.get("failed"):
                    failed[sample["row"]] = failed.get(sample["row"], 0) + 1
                    by_row.setdefault(sample["row"], [])
                else:
                    by_row.setdefault(sample["row"], []).append(sample)
        postcopy = case.startswith("postcopy")
        reference = {
            row: median(by_row.get(row, []), "total_ms" if postcopy else "throughput_MBps")
            for row in ("qemu", "trimig", "raw-memfd")
        }
        summary[case] = {}
        for row, group in by_row.items():
            mine = median(group, "total_ms" if postcopy else "throughput_MBps")

            p50 = median(group, "postcopy_latency_p50_us")
            p99 = median(group, "postcopy_latency_p99_us")
            latency = f"{p50:.0f}/{p99:.0f}" if p50 is not None and p99 is not None else "-"
            mbps = median(group, "mbps")
            lines.append(
                f"{ROW_NAMES.get(row, row):24} {spread(group, 'throughput_MBps'):>17} "
                f"{(f'{mbps:.0f}' if mbps else '-'):>7} {spread(group, 'total_ms'):>17} "
                f"{spread(group, 'downtime_ms'):>9} {spread(group, 'pause_ms', digits=1):>15} "
                f"{latency:>10} {cpu_pair(group, 'all'):>9} {cpu_pair(group, 'engine'):>9} "
                f"{side_pair(group, '{side}_own_peak_MiB', 0):>9} "
                f"{versus(row, 'qemu', mine, reference, postcopy):>6} "
                f"{versus(row, 'trimig', mine, reference, postcopy):>5} "
                f"{versus(row, 'raw-memfd', mine, reference, postcopy):>5}"
            )
            summary[case][row] = {key: median(group, key) for key in SUMMARY_KEYS}
            summary[case][row]["n"] = len(group)
            summary[case][row]["failed"] = failed.get(row, 0)
        for row, count in failed.items():
            lines.append(f"  {ROW_NAMES.get(row, row)}: {count} failed (see the JSON)")
    lines += tls_lines(summary)
    loads = [s["loadavg"][0] for s in results["warmup"] + samples]
    if loads:
        lines += [
            "",
            f"load average (1 min) before the samples: {min(loads):.2f}-{max(loads):.2f} "
            f"(median {statistics.median(loads):.2f}) on {os.cpu_count()} CPUs",
        ]
    return "\n".join(lines), summary


def tls_lines(summary: dict[str, Any]) -> list[str]:
    """Each engine's TLS case against its plaintext one of the same run (throughput ratios,
    postcopy: total-time, plaintext / TLS; below 1 is the cost of TLS), and trimig's TLS
    against QEMU's."""
    lines = []
    for case, rows in summary.items():
        plain_case = case.replace("-tls-", "-")
        if not parse_case(case)[1] or plain_case not in summary:
            continue
        postcopy = parse_case(case)[0]
        key = "total_ms" if postcopy else "throughput_MBps"
        tls = {row: rows.get(row, {}).get(key) for row in ("qemu", "trimig")}
        plain = {row: summary[plain_case].get(row, {}).get(key) for row in ("qemu", "trimig")}
        pairs = [
            ("QEMU TLS / QEMU plain", tls["qemu"], plain["qemu"]),
            ("trimig TLS / trimig plain", tls["trimig"], plain["trimig"]),
            ("trimig TLS / QEMU TLS", tls["trimig"], tls["qemu"]),
        ]
        figures = ", ".join(
            f"{name} {ratio(bottom, top) if postcopy else ratio(top, bottom)}"
            for name, top, bottom in pairs
        )
        lines += ["", f"{case} against {plain_case} ({key}; above 1: faster):", f"  {figures}"]
    return lines

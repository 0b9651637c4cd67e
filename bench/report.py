"""Merge benchmark JSON lines into ``results.json`` and ``results.md``.

Used by ``scripts/bench``; standard library only. Every input line is one run:
``{"system", "mode", "workload", "batch_size", "messages", "seconds", "msgs_per_s",
"p50_ms", "p99_ms", "max_ms", "cpu_s", "peak_rss_mb", "settings"}``.

``results.json`` is ``{"machine": {...}, "command": ..., "results": [...], "failures": [...]}``.
``results.md`` has one table per workload; for outbox-rs rows the last two columns are
its msgs/s divided by faststream-outbox's and by the Postgres ceiling's at the same
workload and batch size.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

WORKLOAD_ORDER = ["drain", "steady-1000", "steady-10000"]
SYSTEM_ORDER = ["outbox-rs", "faststream-outbox", "postgres-ceiling"]


def load(paths: list[Path]) -> list[dict[str, Any]]:
    """All JSON lines of the files that exist (blank and non-JSON lines are skipped)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
    return rows


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def ratio(ours: float, other: dict[str, Any] | None) -> str:
    if other is None or not other.get("msgs_per_s"):
        return "–"
    return f"{ours / other['msgs_per_s']:.2f}×"


def markdown(rows: list[dict[str, Any]], machine: dict[str, Any], failures: list[str]) -> str:
    """One Markdown table per workload, plus the machine facts and each run's settings."""
    out = ["# Benchmark results", ""]
    out.append(
        f"{machine.get('date', '')} · {machine.get('nproc', '?')} CPUs · {machine.get('memory', '?')} RAM · "
        f"{machine.get('postgres', '?')} · Kafka {machine.get('kafka', '?')}"
    )
    out += ["", f"Command: `{machine.get('command', '')}`", ""]
    if failures:
        out += ["**Parts that failed:**", ""] + [f"- {f}" for f in failures] + [""]

    def key(r: dict[str, Any]) -> tuple[int, str, int]:
        system = r.get("system", "")
        order = SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)
        return (order, r.get("mode", ""), int(r.get("batch_size", 0)))

    workloads = sorted({r["workload"] for r in rows}, key=lambda w: (w not in WORKLOAD_ORDER, WORKLOAD_ORDER.index(w) if w in WORKLOAD_ORDER else 0, w))
    for workload in workloads:
        runs = sorted((r for r in rows if r["workload"] == workload), key=key)
        fs = {r["batch_size"]: r for r in runs if r["system"] == "faststream-outbox"}
        ceiling = {r["batch_size"]: r for r in runs if r["system"] == "postgres-ceiling"}
        out += [f"## {workload}", ""]
        out.append(
            "| system | mode | batch | messages | msgs/s | p50 ms | p99 ms | max ms | CPU s | peak RSS MB "
            "| ÷ faststream-outbox | ÷ Postgres ceiling |"
        )
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in runs:
            ours = r["system"] == "outbox-rs"
            out.append(
                f"| {r['system']} | {r['mode']} | {r['batch_size']} | {r['messages']:,} | {fmt(r['msgs_per_s'], 0)} "
                f"| {fmt(r.get('p50_ms'))} | {fmt(r.get('p99_ms'))} | {fmt(r.get('max_ms'))} "
                f"| {fmt(r.get('cpu_s'), 2)} | {fmt(r.get('peak_rss_mb'))} "
                f"| {ratio(r['msgs_per_s'], fs.get(r['batch_size'])) if ours else ''} "
                f"| {ratio(r['msgs_per_s'], ceiling.get(r['batch_size'])) if ours else ''} |"
            )
        out.append("")
    out += ["## Settings", ""]
    for r in sorted(rows, key=lambda r: (r["workload"], *key(r))):
        out.append(f"- **{r['system']} {r['mode']} {r['workload']} batch {r['batch_size']}**: {r.get('settings', '')}")
    out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-json", type=Path, required=True)
    parser.add_argument("--out-md", type=Path, required=True)
    parser.add_argument("--machine", required=True, help="JSON object of machine facts")
    parser.add_argument("--failure", action="append", default=[], help="a part that failed (repeatable)")
    parser.add_argument("inputs", nargs="*", type=Path, help="JSON-lines files")
    args = parser.parse_args()

    machine: dict[str, Any] = json.loads(args.machine)
    rows = load(args.inputs)
    document = {"machine": machine, "command": machine.get("command"), "failures": args.failure, "results": rows}
    args.out_json.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    args.out_md.write_text(markdown(rows, machine, args.failure), encoding="utf-8")


if __name__ == "__main__":
    main()

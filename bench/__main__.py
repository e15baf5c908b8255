"""``python -m bench [--quick] [--only NAME ...]``: every benchmark, one table, one JSON file.

Each module of `BENCHMARKS` that exposes ``run(quick: bool) -> dict`` is run in a child
process of its own (``python -m bench --child NAME``), so that one benchmark's processes,
threads or trio loop cannot disturb the next, a crash is contained, and a time cap can be
enforced: with ``--quick`` the caps of `QUICK_CAPS` apply and the whole suite stays under two
minutes; a module that goes past its cap is stopped and reported as ``timeout``. A module that
is missing, has no ``run`` or raises is reported with a note and the others still run.

The table has one row per figure: its value, the benchmark's same-run baseline (or the one it
documents), the ratio figure / baseline, the goal and whether it is met. A module describes
its rows with a ``summary`` list in its result (``figure``, ``value``, ``unit``, ``baseline``,
``baseline_name``, ``ratio``, ``goal``, ``pass``); for modules written before that convention
`ADAPTERS` reads their own result shape, and anything else falls back to its ``*ratio*`` and
``*_met`` keys.

Written: ``bench/results/all-<UTC timestamp>[-quick].json`` and ``bench/results/latest.json``,
holding the machine's description, every module's status, run time, result and the table.
(Each module also keeps writing its own ``bench/results/<name>.json``.)
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

from bench.common import REPO_ROOT, RESULTS_DIR, machine_description

BENCHMARKS = (
    "svp_lookups",
    "datapath",
    "firewall",
    "store",
    "convergence",
    "kernel_datapath",
    "kernel_firewall",
)
#: seconds each module may take with --quick (sum 195 s: the suite stays under four minutes)
QUICK_CAPS = {
    "svp_lookups": 26.0,
    "datapath": 15.0,
    "firewall": 8.0,
    "store": 34.0,
    "convergence": 32.0,
    "kernel_datapath": 40.0,
    "kernel_firewall": 40.0,
}
QUICK_BUDGET = 195.0
FULL_CAP = 3600.0

Row = dict[str, Any]


# ------------------------------------------------------------------------------ machine


def describe_machine() -> dict[str, Any]:
    info = machine_description()
    info["cores"] = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
                    break
    except OSError:
        pass
    try:
        import trio

        info["trio"] = trio.__version__
    except ImportError:
        info["trio"] = None
    info["python"] = platform.python_version()
    info["hostname"] = platform.node()
    return info


# ------------------------------------------------------------------------------ rows


def _row(
    module: str,
    figure: str,
    value: float | None,
    unit: str = "",
    baseline: float | None = None,
    baseline_name: str = "",
    goal: str = "",
    passed: bool | None = None,
    ratio: float | None = None,
) -> Row:
    if ratio is None and value is not None and baseline:
        ratio = value / baseline
    return {
        "module": module,
        "figure": figure,
        "value": value,
        "unit": unit,
        "baseline": baseline,
        "baseline_name": baseline_name,
        "ratio": ratio,
        "goal": goal,
        "pass": passed,
    }


def rows_from_summary(module: str, result: dict[str, Any]) -> list[Row]:
    rows = []
    for item in result["summary"]:
        rows.append(
            _row(
                module,
                str(item.get("figure", "?")),
                item.get("value"),
                str(item.get("unit", "")),
                item.get("baseline"),
                str(item.get("baseline_name", "")),
                str(item.get("goal", "")),
                item.get("pass"),
                item.get("ratio"),
            )
        )
    return rows


def rows_svp_lookups(module: str, r: dict[str, Any]) -> list[Row]:
    ceiling = r["ceiling"]["rate"]
    minimum = r.get("goals", {}).get("vl2_ratio_min", 0.25)
    rows = []
    for size, s in r["sizes"].items():
        n = int(size)
        rows.append(
            _row(
                module,
                f"VL2 lookups/s, {n:,} VNICs",
                s["vl2_rate"],
                "/s",
                ceiling,
                "trio fixed-reply server",
                f">= {minimum:g} x ceiling",
                s["vl2_ratio"] >= minimum,
            )
        )
        rows.append(
            _row(
                module,
                f"VL3 lookups/s, {n:,} VNICs",
                s["vl3_rate"],
                "/s",
                ceiling,
                "trio fixed-reply server",
            )
        )
        rows.append(
            _row(
                module,
                f"VL2 p99 latency, {n:,} VNICs",
                s["vl2_p99_us"],
                "us",
                r["ceiling"].get("p99_us"),
                "ceiling p99",
            )
        )
    goals = r.get("goals", {})
    if "large_vs_small" in goals:
        small, large = sorted(r["sizes"], key=int)
        rows.append(
            _row(
                module,
                f"VL2 rate {int(large):,} / {int(small):,} VNICs",
                goals["large_vs_small"],
                "x",
                1.0,
                f"{int(small):,} VNICs",
                ">= 0.90",
                goals.get("large_within_10pct_met"),
            )
        )
    return rows


def rows_firewall(module: str, r: dict[str, Any]) -> list[Row]:
    by = r["by_rules"]
    base = by.get("10", {}).get("new_pps")
    goal = r.get("goal_ratio", 1 / 1.2)
    rows = []
    for count, s in sorted(by.items(), key=lambda kv: int(kv[0])):
        is_goal = count == "10000"
        rows.append(
            _row(
                module,
                f"new-flow pps, {int(count):,} rules",
                s.get("new_pps"),
                "pkt/s",
                base,
                "10 rules",
                f"ratio >= {goal:.2f}" if is_goal else "",
                (s["new_pps"] / base >= goal) if is_goal and base else None,
            )
        )
    for key in ("ratio_10k_over_10_mixed", "ratio_10k_over_10_shim"):
        if key in r:
            kind = key.rsplit("_", 1)[1]
            rows.append(
                _row(
                    module,
                    f"{kind} pps 10k / 10 rules",
                    r[key],
                    "x",
                    1.0,
                    "10 rules",
                    f">= {goal:.2f}",
                    r[key] >= goal,
                )
            )
    return rows


def rows_generic(module: str, r: dict[str, Any]) -> list[Row]:
    """Numbers named like ratios, and booleans named like goals, at any depth."""
    rows: list[Row] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, bool):
            if prefix.endswith("_met") or prefix.endswith("goal_met"):
                rows.append(_row(module, prefix, None, goal=prefix, passed=value))
        elif isinstance(value, int | float) and "ratio" in prefix.rsplit(".", 1)[-1]:
            rows.append(_row(module, prefix, float(value), "x", ratio=float(value)))

    walk("", r)
    if not rows:
        rows.append(_row(module, "(no figures recognised; see its JSON)", None))
    return rows


def rows_store(module: str, r: dict[str, Any]) -> list[Row]:
    backends = r["backends"]
    sqlite, pg = backends.get("sqlite"), backends.get("postgresql")
    rows = []
    for kind, unit, goal in (("creates", "/s", ""), ("lookups", "/s", ">= 0.90 x SQLite")):
        base = sqlite[kind]["rate"] if sqlite else None
        if sqlite:
            rows.append(_row(module, f"{kind}/s, SQLite", base, unit))
        if pg:
            value = pg[kind]["rate"]
            passed = (value / base >= 0.9) if goal and base else None
            rows.append(
                _row(module, f"{kind}/s, PostgreSQL", value, unit, base, "SQLite", goal, passed)
            )
    coherence = (pg or {}).get("coherence")
    if coherence:
        goal_ms = coherence.get("goal_ms", 100.0)
        rows.append(
            _row(
                module,
                "cross-instance coherence p99 (after commit)",
                coherence["after_commit_p99_ms"] / 1000,
                "s",
                goal_ms / 1000,
                "goal",
                f"<= {goal_ms:g} ms",
                coherence.get("goal_met"),
            )
        )
    restore = r.get("varpd_restore")
    if restore:
        runs = restore["runs"]
        rows.append(
            _row(
                module,
                f"varpd restore ms/instance, {runs[-1]['instances']:,} instances",
                runs[-1]["ms_per_instance"],
                "ms",
                runs[0]["ms_per_instance"],
                f"{runs[0]['instances']:,} instances",
                f"<= {restore['goal_ratio']:g} x",
                restore["goal_met"],
            )
        )
    return rows


ADAPTERS: dict[str, Callable[[str, dict[str, Any]], list[Row]]] = {
    "svp_lookups": rows_svp_lookups,
    "firewall": rows_firewall,
    "store": rows_store,
}


def rows_for(module: str, result: dict[str, Any]) -> list[Row]:
    try:
        if isinstance(result.get("summary"), list):
            return rows_from_summary(module, result)
        if module in ADAPTERS:
            return ADAPTERS[module](module, result)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        rows = rows_generic(module, result)
        rows[0]["note"] = f"result shape not understood ({type(exc).__name__}: {exc})"
        return rows
    return rows_generic(module, result)


# ------------------------------------------------------------------------------ table


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if unit == "s":
            return f"{value * 1000:,.0f} ms"
        if abs(value) >= 1000:
            text = f"{value:,.0f}"
        elif abs(value) >= 10:
            text = f"{value:.1f}"
        else:
            text = f"{value:.3g}"
    else:
        text = str(value)
    return f"{text} {unit}".strip() if unit and unit not in ("x",) else text


TABLE_WIDTH = 120


def print_table(rows: list[Row], notes: list[str]) -> None:
    headers = ["benchmark", "figure", "value", "baseline", "ratio", "goal", "pass"]
    lines = []
    for r in rows:
        base = fmt(r["baseline"], r["unit"])
        if r["baseline_name"]:
            base = (
                f"{base} ({r['baseline_name']})"
                if r["baseline"] is not None
                else r["baseline_name"]
            )
        lines.append(
            [
                r["module"],
                r["figure"],
                fmt(r["value"], r["unit"]),
                base,
                "-" if r["ratio"] is None else f"{r['ratio']:.3f}",
                r["goal"] or "-",
                "-" if r["pass"] is None else ("pass" if r["pass"] else "FAIL"),
            ]
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(headers)
    ]
    # fit TABLE_WIDTH columns: shorten the figure and baseline columns (ellipsis); the JSON
    # keeps the full text
    while sum(widths) + 2 * (len(widths) - 1) > TABLE_WIDTH and max(widths[1], widths[3]) > 16:
        widths[1 if widths[1] >= widths[3] else 3] -= 1
    for line in lines:
        for i in (1, 3):
            if len(line[i]) > widths[i]:
                line[i] = line[i][: widths[i] - 1] + "…"
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for line in lines:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
    for note in notes:
        print(f"note: {note}")


# ------------------------------------------------------------------------------ running


def run_child(name: str, quick: bool, out_path: str) -> int:
    """In the child process: import bench.NAME, run it, write its result as JSON."""
    module = importlib.import_module(f"bench.{name}")
    result = module.run(quick)
    with open(out_path, "w") as f:
        json.dump(result, f, default=str)
    return 0


def run_module(name: str, quick: bool, cap: float) -> dict[str, Any]:
    entry: dict[str, Any] = {"status": "ok", "seconds": 0.0, "note": ""}
    try:
        module = importlib.import_module(f"bench.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"bench.{name}":
            return {**entry, "status": "missing", "note": f"bench/{name}.py is not there"}
        return {**entry, "status": "error", "note": f"import failed: {exc}"}
    except Exception as exc:  # a broken module must not stop the suite
        return {**entry, "status": "error", "note": f"import failed: {type(exc).__name__}: {exc}"}
    if not callable(getattr(module, "run", None)):
        return {**entry, "status": "missing", "note": f"bench.{name} has no run(quick)"}
    fd, out_path = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")
    os.close(fd)
    argv = [sys.executable, "-m", "bench", "--child", name, "--child-out", out_path]
    if quick:
        argv.append("--quick")
    print(f"\n===== bench.{name} ({'quick, ' if quick else ''}cap {cap:.0f} s)", flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO_ROOT, start_new_session=True)
    try:
        code = proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        entry.update(status="timeout", note=f"stopped after its {cap:.0f} s cap")
        code = None
    entry["seconds"] = time.perf_counter() - started
    try:
        if code == 0:
            with open(out_path) as f:
                entry["results"] = json.load(f)
        elif code is not None:
            entry.update(status="error", note=f"run() failed (exit {code}); see its output above")
    except (OSError, ValueError) as exc:
        entry.update(status="error", note=f"no readable result: {exc}")
    finally:
        os.unlink(out_path)
    return entry


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """Stop the child and whatever it started (its own session: servers, load workers)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="short runs (whole suite < 2 min)")
    p.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=BENCHMARKS,
        help=f"run only these ({', '.join(BENCHMARKS)})",
    )
    p.add_argument("--child", metavar="NAME", help=argparse.SUPPRESS)
    p.add_argument("--child-out", metavar="PATH", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return run_child(args.child, args.quick, args.child_out)

    names = list(args.only or BENCHMARKS)
    started = time.perf_counter()
    modules: dict[str, Any] = {}
    for name in names:
        if args.quick:
            left = QUICK_BUDGET - (time.perf_counter() - started)
            cap = max(5.0, min(QUICK_CAPS.get(name, 20.0), left))
        else:
            cap = FULL_CAP
        modules[name] = run_module(name, args.quick, cap)
    total = time.perf_counter() - started

    rows: list[Row] = []
    notes: list[str] = []
    for name, entry in modules.items():
        if entry["status"] == "ok":
            module_rows = rows_for(name, entry["results"])
            rows.extend(module_rows)
            notes.extend(f"{name}: {r['note']}" for r in module_rows if r.get("note"))
        else:
            notes.append(f"{name}: {entry['status']}: {entry['note']}")
    machine = describe_machine()
    print(
        f"\n===== all benchmarks ({'quick' if args.quick else 'full'}, {total:.0f} s) on "
        f"{machine.get('cpu') or '?'} x{machine.get('cores')}, "
        f"{machine.get('memory_gib', '?')} GiB, Python {machine['python']}, "
        f"trio {machine.get('trio')}"
    )
    print_table(rows, notes)
    print(
        "run times: "
        + ", ".join(f"{n} {e['seconds']:.1f} s ({e['status']})" for n, e in modules.items())
    )

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    doc = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "quick": args.quick,
        "seconds": total,
        "machine": machine,
        "modules": modules,
        "table": rows,
        "notes": notes,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"all-{stamp}{'-quick' if args.quick else ''}.json"
    text = json.dumps(doc, indent=2, default=str) + "\n"
    path.write_text(text)
    (RESULTS_DIR / "latest.json").write_text(text)
    print(f"results written to {os.path.relpath(path)} and bench/results/latest.json")
    # Goals not met are findings, shown in the table; a benchmark that broke is a failure.
    broken = [n for n, e in modules.items() if e["status"] in ("error", "timeout")]
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

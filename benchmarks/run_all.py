"""Run every benchmark in this directory and write ``docs/benchmarks.md``.

Run: ``.venv/bin/python benchmarks/run_all.py [--quick] [--only NAME ...] [--timeout 900] [--out docs/benchmarks.md]
[--readme]`` (as root for the lab benchmarks; ``--readme`` also rewrites README.md's Benchmarks section).

Each ``*_bench.py`` runs as its own subprocess (one at a time, so they do not compete for the cores) and
prints its own table; the report has

* a side-by-side table: this project next to tailscaled 1.96.4 (``lab_paths_bench``: direct, peer-relay
  and DERP paths between real processes in lab namespaces) and next to the kernel through wireguard-go
  (``netstack_bench``), with the ratios;
* PNG charts in ``docs/benchmarks/`` (only when matplotlib is importable: ``pip install -e .[bench]``);
* one summary table (benchmark, status, wall time, headline figure), then every benchmark's table as
  printed, plus the ``tsnet demo`` figures (a loopback transfer between two in-process nodes).

``--quick`` passes smaller sizes to the benchmarks that take them and finishes in a few minutes; the
full mode takes longer (the lab benchmark alone builds four labs and measures both directions). The
machine (CPU, cores, memory, kernel, Python) and its load average are stated at the top. The lab
benchmarks need root (network namespaces).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_DIR = ROOT / "benchmarks"

#: Smaller arguments for ``--quick`` (benchmarks not listed run with their defaults).
QUICK_ARGS: dict[str, list[str]] = {
    "control_bench": ["--peers", "50", "--rounds", "10", "--nodes", "0"],
    "derp_bench": ["--seconds", "1", "--idle", "500"],
    "filter_bench": ["--n", "20000"],
    "lab_paths_bench": ["--seconds", "2", "--pings", "50", "--directions", "down", "--repeat", "1"],
    "netstack_bench": ["--size", "16", "--rtt-count", "200", "--conns", "100"],
    "paths_bench": ["--packets", "2000", "--rounds", "1", "--pings", "50"],
    "relay_bench": ["--packets", "10000"],
    "server_bench": ["--mb", "4", "--runs", "1"],
    "stack_bench": ["--size", "4"],
    "tcp_bench": ["--mb", "8"],
    "wg_bench": ["--packets", "1000", "--repeats", "3"],
}


@dataclass
class Outcome:
    name: str
    status: str
    seconds: float
    output: str
    headline: str = ""
    #: Structured results, for benchmarks that write JSON (lab_paths_bench).
    data: dict[str, Any] = field(default_factory=dict)


def machine() -> dict[str, str]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = "?"
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
            mem = f"{kib / (1 << 20):.1f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "CPU": cpu,
        "cores usable": str(affinity),
        "memory": mem,
        "kernel": f"{platform.system()} {platform.release()}",
        "Python": f"{platform.python_implementation()} {platform.python_version()}",
        "date (UTC)": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
    }


def run(name: str, argv: list[str], timeout: float) -> Outcome:
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGTERM first: the lab benchmark removes its namespaces and processes on SIGTERM.
        proc.terminate()
        try:
            stdout, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, _ = proc.communicate()
        return Outcome(name, f"timed out after {timeout:g}s", time.monotonic() - started, (stdout or "").strip())
    except BaseException:  # Ctrl-C: let the child clean up before we go
        proc.terminate()
        proc.wait(60)
        raise
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    output = stdout if proc.returncode == 0 else stdout + "\n" + stderr[-3000:]
    return Outcome(name, status, time.monotonic() - started, output.strip())


def demo_headline(output: str) -> str:
    m = re.search(r"path (.+?); RTT ([\d.]+ ms); throughput ([\d.]+ MiB/s)", output)
    return f"{m.group(3)}, RTT {m.group(2)}, {m.group(1)}" if m else ""


PAIR_NAMES = {"py-py": "Python ↔ Python", "py-ts": "Python ↔ tailscaled", "ts-ts": "tailscaled ↔ tailscaled"}
PATH_NAMES = {"direct": "direct", "relay": "peer relay (tsnet relay)", "relay-ts": "peer relay (tailscaled relay)",
              "derp": "DERP"}


def lab_values(data: dict[str, Any]) -> dict[tuple[str, str, str], float]:
    """``(path, pair, metric) -> value`` from lab_paths_bench's JSON (failed measurements left out)."""
    return {(r["path"], r["pair"], r["metric"]): r["value"] for r in data.get("results", ()) if r["value"] is not None}


def lab_moved(data: dict[str, Any]) -> set[tuple[str, str, str]]:
    """Measurements after whose kept run the nodes reported another path than the one measured."""
    return {(r["path"], r["pair"], r["metric"]) for r in data.get("results", ())
            if (r.get("extra") or {}).get("path_moved")}


def netstack_values(output: str) -> dict[str, float]:
    """``what -> number`` from netstack_bench's table (Mbit/s and us rows)."""
    values = {}
    for line in output.splitlines():
        m = re.match(r"^(\S.*?)\s{2,}([\d.]+) (Mbit/s|us)\b", line)
        if m:
            values[m.group(1).strip()] = float(m.group(2))
    return values


def _pct(a: float | None, b: float | None) -> str:
    return f"{a / b:.0%}" if a is not None and b else "-"


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    return f"{v:.0f} {unit}" if unit == "Mbit/s" else f"{v:.2f} {unit}"


def lab_headline(data: dict[str, Any]) -> str:
    v = lab_values(data)
    d = (data.get("directions") or ["down"])[0]
    a, b = v.get(("direct", "py-ts", d)), v.get(("direct", "ts-ts", d))
    if a is None:
        return ""
    return f"direct Python↔tailscaled {a:.0f} Mbit/s ({_pct(a, b)} of tailscaled↔tailscaled)"


def compact_table(outcomes: list[Outcome]) -> list[str]:
    """Paths x pairs, throughput (first direction) and RTT, with the ratios to tailscaled and to direct.

    The README's benchmark table is this one, copied from the last full run.
    """
    lab = next((o for o in outcomes if o.name == "lab_paths_bench" and o.data), None)
    if lab is None:
        return []
    v = lab_values(lab.data)
    moved = lab_moved(lab.data)
    d = (lab.data.get("directions") or ["down"])[0]
    out = ["| Path | Python ↔ Python | Python ↔ tailscaled | tailscaled ↔ tailscaled | Py↔ts / ts↔ts | "
           "Py↔Py / ts↔ts | Py↔ts vs its direct |", "|---|---:|---:|---:|---:|---:|---:|"]
    for path in PATH_NAMES:
        if not any(k[0] == path for k in v):
            continue
        cells = []
        for pair in PAIR_NAMES:
            t, r = v.get((path, pair, d)), v.get((path, pair, "rtt"))
            cells.append(f"{_fmt(t, 'Mbit/s')}{' ‡' if (path, pair, d) in moved else ''}, {_fmt(r, 'ms')}")
        ts = v.get((path, "ts-ts", d))
        direct = v.get(("direct", "py-ts", d))
        cells += [_pct(v.get((path, "py-ts", d)), ts), _pct(v.get((path, "py-py", d)), ts),
                  "-" if path == "direct" else _pct(v.get((path, "py-ts", d)), direct)]
        out.append(f"| {PATH_NAMES[path]} | " + " | ".join(cells) + " |")
    out += ["", f"TCP throughput {'server → client' if d == 'down' else 'client → server'} over one connection, "
            "and median 1-byte round trip, in lab namespaces on one machine."]
    if any((path, pair, d) in moved for path in PATH_NAMES for pair in PAIR_NAMES):
        out += ["‡ Right after that transfer the two nodes did not both report the path being measured: it may",
                "have run partly over another path (DERP most likely: compare the DERP row)."]
    return out


def targets(outcomes: list[Outcome]) -> list[str]:
    """The magicsock issue's targets, met or not, from the lab results (first direction)."""
    lab = next((o for o in outcomes if o.name == "lab_paths_bench" and o.data), None)
    if lab is None:
        return []
    v = lab_values(lab.data)
    d = (lab.data.get("directions") or ["down"])[0]

    def line(what: str, value: float | None, goal: float, shown: str) -> str:
        verdict = "not measured" if value is None else ("met" if value >= goal else "**not met**")
        return f"* {what}: {shown} — {verdict}"

    out = []
    for relay in ("relay", "relay-ts"):
        for pair in PAIR_NAMES:
            a, b = v.get((relay, pair, d)), v.get(("direct", pair, d))
            if (relay, pair, d) in v:
                out.append(line(f"{PATH_NAMES[relay]} ≥ 80% of direct, {PAIR_NAMES[pair]}",
                                a / b if a is not None and b else None, 0.8, _pct(a, b)))
    pyts, tsts = v.get(("direct", "py-ts", d)), v.get(("direct", "ts-ts", d))
    out.append(line("Python ↔ tailscaled direct ≥ 500 Mbit/s", pyts, 500, _fmt(pyts, "Mbit/s")))
    out.append(line("Python ↔ tailscaled direct ≥ 50% of tailscaled ↔ tailscaled",
                    pyts / tsts if pyts is not None and tsts else None, 0.5, _pct(pyts, tsts)))
    return out


def side_by_side(outcomes: list[Outcome]) -> list[str]:
    """The one comparison table: this project | tailscaled 1.96.4 or kernel | ratio."""
    rows: list[tuple[str, str, str, str]] = []
    lab = next((o for o in outcomes if o.name == "lab_paths_bench"), None)
    if lab is not None and lab.data:
        v = lab_values(lab.data)
        for d in lab.data.get("directions", ["down"]):
            label = "server → client" if d == "down" else "client → server"
            for path in PATH_NAMES:
                ts = v.get((path, "ts-ts", d))
                for pair in ("py-ts", "py-py"):
                    if (path, pair, d) in v or (path, "ts-ts", d) in v:
                        rows.append((f"TCP throughput, {PATH_NAMES[path]}, {PAIR_NAMES[pair]} ({label})",
                                     _fmt(v.get((path, pair, d)), "Mbit/s"), _fmt(ts, "Mbit/s") + " (ts↔ts)",
                                     _pct(v.get((path, pair, d)), ts)))
        for path in PATH_NAMES:
            ts = v.get((path, "ts-ts", "rtt"))
            for pair in ("py-ts", "py-py"):
                if (path, pair, "rtt") in v or ts is not None:
                    mine = v.get((path, pair, "rtt"))
                    rows.append((f"1-byte TCP RTT (median), {PATH_NAMES[path]}, {PAIR_NAMES[pair]}",
                                 _fmt(mine, "ms"), _fmt(ts, "ms") + " (ts↔ts)",
                                 _pct(ts, mine) + " speed" if mine and ts else "-"))
    ns = next((o for o in outcomes if o.name == "netstack_bench"), None)
    if ns is not None:
        v2 = netstack_values(ns.output)
        kab = v2.get("kernel<->kernel TCP a->b (2x wireguard-go)")
        kba = v2.get("kernel<->kernel TCP b->a (2x wireguard-go)")
        kern = (kab + kba) / 2 if kab and kba else (kab or kba)
        for what in ("Python->kernel TCP (1 stream)", "kernel->Python TCP (1 stream)"):
            if what in v2:
                rows.append((f"netstack {what} vs kernel↔kernel (wireguard-go)", _fmt(v2[what], "Mbit/s"),
                             _fmt(kern, "Mbit/s") + " (kernel)", _pct(v2[what], kern)))
        pk, kk = v2.get("Python<->kernel 1-byte RTT median"), v2.get("kernel<->kernel 1-byte RTT median")
        if pk and kk:
            rows.append(("netstack 1-byte RTT median vs kernel↔kernel", f"{pk:.0f} µs", f"{kk:.0f} µs (kernel)",
                         _pct(kk, pk) + " speed"))
    if not rows:
        return ["(neither lab_paths_bench nor netstack_bench ran: no side-by-side figures)"]
    out = ["| Measurement | this project | reference, same run | ratio |", "|---|---:|---:|---:|"]
    out += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    out += ["", "Ratios: this project / reference for throughput; reference RTT / our RTT for latency",
            "(100% = as fast).",
            "\"Python ↔ tailscaled\" has one tsnet node and one tailscaled node; throughput is over one TCP",
            "connection through the client node's SOCKS5 proxy to a sink on the server node's 127.0.0.1, the same",
            "way for every pair (see `benchmarks/lab_paths_bench.py`)."]
    return out


def cpu_table(outcomes: list[Outcome]) -> list[str]:
    """Node CPU per GB moved, by path, pair and direction: where the cores go (lab_paths_bench's cpu_s_per_gb)."""
    lab = next((o for o in outcomes if o.name == "lab_paths_bench" and o.data), None)
    if lab is None:
        return []
    cpu = {(r["path"], r["pair"], r["metric"]): r["extra"]["cpu_s_per_gb"]
           for r in lab.data.get("results", ()) if (r.get("extra") or {}).get("cpu_s_per_gb")}
    if not cpu:
        return []
    kinds = {"py": "Python", "ts": "tailscaled"}
    out = ["| Path | Pair | Direction | client node | server node | peer relay server |",
           "|---|---|---|---:|---:|---:|"]
    for path in PATH_NAMES:
        for pair in PAIR_NAMES:
            for d in lab.data.get("directions", ["down"]):
                c = cpu.get((path, pair, d))
                if c is None:
                    continue
                ck, sk = pair.split("-")
                out.append(f"| {PATH_NAMES[path]} | {PAIR_NAMES[pair]} | "
                           f"{'server → client' if d == 'down' else 'client → server'} | "
                           f"{c['client']:.1f} s/GB ({kinds[ck]}) | {c['server']:.1f} s/GB ({kinds[sk]}) | "
                           + (f"{c['relay']:.1f} s/GB ({'Python' if path == 'relay' else 'tailscaled'}) |"
                              if "relay" in c else "- |"))
    out += ["", "CPU time (user + system, all threads) that each node process spent per GB of payload, warm-up",
            "included. It varies less than Mbit/s with what else the machine runs (though not nothing: a busy",
            "neighbour slows every instruction), and it shows the bottleneck: a Python node is one thread on one",
            "core, so its throughput is at most 1 core / its CPU per GB, while tailscaled spreads over both cores."]
    d = (lab.data.get("directions") or ["down"])[0]
    py, ts = cpu.get(("direct", "py-ts", d)), cpu.get(("direct", "ts-ts", d))
    if py and ts:
        out += ["", f"Direct, {'receiving' if d == 'down' else 'sending'} node: Python {py['client']:.1f} s/GB, "
                f"tailscaled {ts['client']:.1f} s/GB ({py['client'] / ts['client']:.1f}× as much CPU per byte)."]
    return out


def charts(outcomes: list[Outcome], out_dir: Path) -> list[str]:
    """Write PNG charts when matplotlib is importable; return markdown image links (relative to docs/)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ["(charts skipped: matplotlib is not installed; `pip install -e .[bench]`)"]
    links = []
    out_dir.mkdir(parents=True, exist_ok=True)
    lab = next((o for o in outcomes if o.name == "lab_paths_bench" and o.data), None)
    if lab is not None:
        v = lab_values(lab.data)
        paths = [p for p in PATH_NAMES if any(k[0] == p for k in v)]
        for metric, unit, fname, title in (
                (d, "Mbit/s", f"paths_throughput_{d}.png",
                 f"TCP throughput by path and pair ({'server → client' if d == 'down' else 'client → server'})")
                for d in lab.data.get("directions", ["down"])):
            fig, ax = plt.subplots(figsize=(8, 4.2))
            width = 0.27
            for i, pair in enumerate(PAIR_NAMES):
                vals = [v.get((p, pair, metric), 0.0) for p in paths]
                bars = ax.bar([x + (i - 1) * width for x in range(len(paths))], vals, width, label=PAIR_NAMES[pair])
                ax.bar_label(bars, fmt="%.0f", fontsize=7)
            ax.set_xticks(range(len(paths)), [PATH_NAMES[p] for p in paths], fontsize=8)
            ax.set_ylabel(unit)
            ax.set_title(title, fontsize=10)
            ax.legend(fontsize=8)
            fig.tight_layout()
            fig.savefig(out_dir / fname, dpi=110)
            plt.close(fig)
            links.append(f"![{title}](benchmarks/{fname})")
        fig, ax = plt.subplots(figsize=(8, 4.2))
        width = 0.27
        for i, pair in enumerate(PAIR_NAMES):
            vals = [v.get((p, pair, "rtt"), 0.0) for p in paths]
            bars = ax.bar([x + (i - 1) * width for x in range(len(paths))], vals, width, label=PAIR_NAMES[pair])
            ax.bar_label(bars, fmt="%.1f", fontsize=7)
        ax.set_xticks(range(len(paths)), [PATH_NAMES[p] for p in paths], fontsize=8)
        ax.set_ylabel("ms (median)")
        ax.set_title("1-byte TCP round trip by path and pair", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "paths_rtt.png", dpi=110)
        plt.close(fig)
        links.append("![1-byte TCP round trip by path and pair](benchmarks/paths_rtt.png)")
    ns = next((o for o in outcomes if o.name == "netstack_bench"), None)
    if ns is not None:
        v2 = netstack_values(ns.output)
        items = [(k.replace(" (2x wireguard-go)", "\n(wireguard-go)").replace(" (1 stream)", ""), val)
                 for k, val in v2.items() if k.endswith("(2x wireguard-go)") or k.endswith("(1 stream)")]
        if items:
            fig, ax = plt.subplots(figsize=(8, 3.8))
            colors = ["tab:gray" if k.startswith("kernel<->kernel") else "tab:blue" for k, _ in items]
            bars = ax.bar(range(len(items)), [val for _, val in items], color=colors)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
            ax.set_xticks(range(len(items)), [k for k, _ in items], fontsize=8)
            ax.set_ylabel("Mbit/s")
            ax.set_title("TCP over WireGuard: our netstack vs the kernel (wireguard-go on both kernel ends)",
                         fontsize=10)
            fig.tight_layout()
            fig.savefig(out_dir / "netstack_vs_kernel.png", dpi=110)
            plt.close(fig)
            links.append("![netstack vs kernel](benchmarks/netstack_vs_kernel.png)")
    return links or ["(no chartable results in this run)"]


def render(outcomes: list[Outcome], info: dict[str, str], quick: bool, load_start: tuple[float, float, float],
           chart_links: list[str]) -> str:
    load_end = os.getloadavg()
    lines = ["# Benchmarks", "",
             "Generated by `benchmarks/run_all.py`" + (" with `--quick` (reduced sizes)" if quick else "") + ".", "",
             "## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.items()]
    lines += [f"| load average (1/5/15 min) at start | {' / '.join(f'{x:.2f}' for x in load_start)} |",
              f"| load average (1/5/15 min) at end | {' / '.join(f'{x:.2f}' for x in load_end)} |"]
    lines += ["", "The machine is shared (other work runs on its cores during development), so these numbers are",
              "pessimistic: every benchmark competes for the CPU with whatever else runs, and both ends of every",
              "transfer (plus, for the lab, the relay and DERP) share the same cores. Each side-by-side pair was",
              "measured in the same run, one after the other, so the ratios are fairer than the absolute figures.", ""]
    compact = compact_table(outcomes)
    if compact:
        lines += ["## Paths: this project next to tailscaled 1.96.4", ""] + compact + [""]
        lines += ["Paths: *direct* = every host on the lab's internet, no NAT; *peer relay* = every host behind its",
                  "own hard NAT (no hole punching) and one public relay server granted by the policy, either a",
                  "`tsnet up --relay-server-port` node (tsnet relay) or tailscaled with `tailscale set",
                  "--relay-server-port` (tailscaled relay); *DERP* = UDP between hosts dropped, so everything goes",
                  "through the DERP server embedded in our control server (the same Python DERP server for every",
                  "pair).",
                  "", "Targets (from the magicsock issue):", ""] + targets(outcomes) + [""]
    lines += ["## This project next to tailscaled 1.96.4 and the kernel, in detail", ""] + side_by_side(outcomes) + [""]
    cpu = cpu_table(outcomes)
    if cpu:
        lines += ["## Where the cores go: node CPU per GB", ""] + cpu + [""]
    lines += ["## Charts", ""] + [x + "\n" for x in chart_links]
    lines += ["## Summary", "", "| Benchmark | Status | Wall time | Headline |", "|---|---|---|---|"]
    for o in outcomes:
        lines.append(f"| `{o.name}` | {o.status} | {o.seconds:.1f} s | {o.headline or 'see table below'} |")
    lines.append("")
    for o in outcomes:
        lines += [f"## {o.name}", "", "```", o.output or "(no output)", "```", ""]
    return "\n".join(lines)


def update_readme(readme: Path, outcomes: list[Outcome], info: dict[str, str], quick: bool,
                  load_start: tuple[float, float, float]) -> bool:
    """Replace the body of README's "## Benchmarks" section (up to the next "## ") with the compact table."""
    compact = compact_table(outcomes)
    if not compact or not readme.exists():
        return False
    text = readme.read_text()
    m = re.search(r"^## Benchmarks\n(.*?)(?=^## )", text, flags=re.S | re.M)
    if m is None:
        return False
    body = ["", "Throughput and round trip over each path, this project next to tailscaled 1.96.4, measured in the",
            f"same run by `benchmarks/run_all.py`{' --quick' if quick else ''} ({info['date (UTC)']} UTC, "
            f"{info['CPU']}, "
            f"{info['cores usable']} cores, every process of a transfer on the same cores; load average before the "
            f"run {load_start[0]:.1f}):", ""] + compact + [
            "", "Full report with both directions, netstack vs the kernel (wireguard-go), charts and every",
            "benchmark's own table: [docs/benchmarks.md](docs/benchmarks.md). Regenerate with",
            "`sudo .venv/bin/python benchmarks/run_all.py --readme` (`--quick` for a run of a few minutes; charts need",
            "`pip install -e .[bench]`).", "", ""]
    readme.write_text(text[:m.start(1)] + "\n".join(body) + text[m.end(1):])
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument("--only", nargs="*", metavar="NAME", help="run only these (e.g. wg_bench demo)")
    parser.add_argument("--timeout", type=float, default=900.0, help="per benchmark, seconds (default 900)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    parser.add_argument("--readme", action="store_true",
                        help="also put the paths table in README.md's Benchmarks section")
    args = parser.parse_args(argv)

    names = sorted(p.stem for p in BENCH_DIR.glob("*_bench.py")) + ["demo"]
    if args.only:
        unknown = set(args.only) - set(names)
        if unknown:
            parser.error(f"unknown benchmark(s): {', '.join(sorted(unknown))} (have {', '.join(names)})")
        names = [n for n in names if n in args.only]
    load_start = os.getloadavg()
    outcomes = []
    for name in names:
        extra: list[str] = []
        json_path = None
        if name == "lab_paths_bench":
            json_path = Path(tempfile.mkstemp(prefix="lab_paths_", suffix=".json")[1])
            extra = ["--json", str(json_path)]
        if name == "demo":
            argv = [sys.executable, "-m", "tsnet", "demo"] + (["--size", "16"] if args.quick else [])
        else:
            argv = [sys.executable, str(BENCH_DIR / f"{name}.py")] + (QUICK_ARGS.get(name, []) if args.quick else [])
        print(f"running {name} ...", file=sys.stderr, flush=True)
        outcome = run(name, argv + extra, args.timeout)
        if name == "demo":
            outcome.headline = demo_headline(outcome.output)
        if json_path is not None:
            try:
                outcome.data = json.loads(json_path.read_text() or "{}")
            except (OSError, ValueError):
                outcome.data = {}
            json_path.unlink(missing_ok=True)
            outcome.headline = lab_headline(outcome.data)
        print(f"  {outcome.status} in {outcome.seconds:.1f}s", file=sys.stderr, flush=True)
        outcomes.append(outcome)
    out = Path(args.out)
    links = charts(outcomes, out.parent / "benchmarks")
    info = machine()
    text = render(outcomes, info, args.quick, load_start, links)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    if args.readme and not update_readme(ROOT / "README.md", outcomes, info, args.quick, load_start):
        print("README.md not updated (no lab results, or no '## Benchmarks' section)", file=sys.stderr)
    print(text)
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())

"""Turns scripts/bench's raw results (one roomwire-bench JSON line per run) into BENCHMARKS.md: medians per scenario,
target and size, and the ratio Roomwire / peer.

Usage: python3 bench/report.py RESULTS.jsonl OUT.md MACHINE VERSIONS COMMANDS.txt MODE [REPO_ROOT]
"""
import json
import re
import statistics
import sys

# roomwire-glibc: Roomwire built without jemalloc (scripts/bench's allocator A/B), shown as a peer.
PEERS = ["roomwire-glibc", "nats-ws", "socketio", "uws", "sockudo"]
TARGETS = ["roomwire"] + PEERS


def natural(key):
    """Sort key that orders 'idle ws n=2000' before 'idle ws n=10000'."""
    return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', key)]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=1):
    if v is None:
        return "–"
    if isinstance(v, float) and abs(v) >= 1000:
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return f"{v:,}"


def ratio(a, b):
    return f"{a / b:.2f}" if a is not None and b not in (None, 0) else "–"


def label_key(row):
    """The label without its run number: 'fanout n=1000 run=2' -> 'fanout n=1000'."""
    return re.sub(r"\s*run=\d+", "", row.get("label") or "")


def main():
    path, out, machine, versions, commands_path, mode = sys.argv[1:7]
    rows = [json.loads(line) for line in open(path) if line.strip()]
    failed = [r for r in rows if r.get("failed")]
    rows = [r for r in rows if not r.get("failed")]
    groups = {}
    for r in rows:
        groups.setdefault((label_key(r), r["target"]), []).append(r)
    runs = max((len(v) for v in groups.values()), default=0)
    keys = sorted({k for k, _ in groups}, key=natural)

    md = ["# Benchmarks", ""]
    if mode == "quick":
        md += ["**Smoke run (`scripts/bench --quick`): tiny numbers, only proves the harness works. Not a result.**", ""]
    md += [
        "Produced by `scripts/bench` (generator: `bench/src/main.rs`). Every number is the median of "
        f"{runs} run(s); targets alternate within each run (A B C D, A B C D, ...). Ratios are Roomwire / peer.",
        "",
        "## Machine and versions",
        "",
        f"- machine: {machine}",
        versions,
        "- server (and, for Roomwire, the nats-server behind it) pinned to core 0 with `taskset`, generator to core 1;"
        " clients spread over source addresses 127.0.0.2-5",
        "",
    ]

    def table(title, scenario, columns, note=None):
        rows_out = []
        for key in keys:
            if key.split()[0] != scenario:
                continue
            cells = {t: groups.get((key, t)) for t in TARGETS}
            for variant in ["ws", "wss"] if scenario.startswith("idle") else [None]:
                if variant and f" {variant} " not in f" {key} ":
                    continue
                rows_out.append((key, cells))
        if not rows_out:
            return
        md.extend([f"## {title}", ""])
        if note:
            md.extend([note, ""])
        for name, getter, better in columns:
            present = [t for t in TARGETS if any(c.get(t) for _, c in rows_out)]
            peers = [p for p in PEERS if p in present]
            head = "| case | " + " | ".join(present) + "".join(f" | Roomwire / {p}" for p in peers) + " |"
            md.extend([f"**{name}** ({better})", "", head, "|" + "---|" * (1 + len(present) + len(peers))])
            for key, cells in rows_out:
                vals = {t: med([getter(r) for r in (cells.get(t) or [])]) for t in present}
                line = f"| {key} | " + " | ".join(fmt(vals[t]) for t in present)
                line += "".join(f" | {ratio(vals.get('roomwire'), vals[p])}" for p in peers)
                md.append(line + " |")
            md.append("")

    best = lambda f: (lambda r: f(r["best"]) if r.get("best") else None)  # noqa: E731
    table(
        "1. Idle memory per connection",
        "idle",
        [
            ("server RSS KiB per connection", lambda r: r.get("rss_kib_per_conn"), "lower is better"),
            ("kernel slab KiB per connection, both loopback ends, system-wide",
             lambda r: r.get("kernel_slab_kib_per_conn"), "the kernel's share, reported apart"),
            ("connect errors", lambda r: r.get("connect_errors"), "should be 0"),
        ],
        "RSS from /proc/<pid>/status VmRSS before connecting and after every client joined one of 100 rooms "
        "(Roomwire's figure is Roomwire alone, not the nats-server behind it). Roomwire is also measured over wss.",
    )
    table(
        "1b. Buffers given back after a burst",
        "idle-burst",
        [
            ("server RSS KiB per connection, idle", lambda r: r.get("rss_kib_per_conn"), "lower is better"),
            ("... after a 64 KiB message to every client and 30 s idle",
             lambda r: r.get("rss_after_burst_kib_per_conn"), "target: within 1 KiB of idle"),
            ("clients that received the 64 KiB message", lambda r: r.get("burst_delivered"), "should be n"),
        ],
        "Roomwire only (the burst is published over NATS). Every client joins one of 100 rooms, one 64 KiB message "
        "goes to each room, and RSS is read again 30 s after the last client got it (the heartbeat, 25 s, gives back "
        "what the idle path kept).",
    )
    table(
        "2. Fan-out, one room",
        "fanout",
        [
            ("delivered messages/s at saturation", best(lambda s: s["delivered_per_s"]), "higher is better"),
            ("server CPU-seconds per million deliveries", best(lambda s: s["cpu_s_per_million"]), "lower is better"),
            ("p99 latency µs at that step", best(lambda s: s["p99_us"]), "lower is better"),
            ("connect errors", lambda r: r.get("connect_errors"), "should be 0"),
        ],
        "100-byte payloads; the publish rate is raised step by step until delivered/s falls below 90% of what was "
        "published times subscribers. Roomwire's CPU includes the nats-server it is fed from. The generator runs on "
        "one core: where a server needs more than the generator can read, delivered/s measures the generator, and "
        "CPU-s per million deliveries is the fairer comparison.",
    )
    table(
        "3. Many rooms (2,000 rooms x 5 subscribers)",
        "rooms",
        [
            ("highest delivered/s with p99 under 50 ms", best(lambda s: s["delivered_per_s"]), "higher is better"),
            ("server CPU-seconds per million deliveries", best(lambda s: s["cpu_s_per_million"]), "lower is better"),
            ("p99 latency µs at that step", best(lambda s: s["p99_us"]), "lower is better"),
            ("connect errors", lambda r: r.get("connect_errors"), "should be 0: a refused subscriber shrinks the load"),
        ],
        "Each publish goes to one random room; delivered/s counts what reached subscribers (5 per publish when "
        "every subscriber joined).",
    )
    table(
        "4. Latency at fixed load",
        "latency",
        [
            ("p50 µs", best(lambda s: s["p50_us"]), "lower is better"),
            ("p99 µs", best(lambda s: s["p99_us"]), "lower is better"),
            ("p99.9 µs", best(lambda s: s["p99_9_us"] if "p99_9_us" in s else s["p999_us"]), "lower is better"),
            ("connections the server closed during the run", lambda r: r.get("closed"), "stalled ones may be"),
            ("connect errors", lambda r: r.get("connect_errors"), "should be 0"),
        ],
        "One room, fixed publish rate: 50% of the lower peer's fan-out saturation at this size. 'stalled=1%' makes "
        "1% of the clients stop reading after joining; the target is p99 with stalled clients <= 1.2 x p99 without.",
    )
    table(
        "5. Reconnect storm",
        "storm",
        [
            ("server RSS KiB per connection, 30 s after the last join", lambda r: r.get("rss_kib_per_conn"),
             "lower is better; target: storm <= 1.15 x paced"),
            ("handshakes/s (connect to join confirmed)", lambda r: r.get("handshakes_per_s"), "higher is better"),
            ("p99 ms from TCP connect to join confirmed",
             lambda r: r["join_p99_us"] / 1000 if r.get("join_p99_us") is not None else None, "lower is better"),
            ("server CPU-s per 1,000 handshakes", lambda r: r.get("cpu_s_per_1000_handshakes"), "lower is better"),
            ("server peak RSS MiB (VmHWM)",
             lambda r: r["rss_peak_kib"] / 1024 if r.get("rss_peak_kib") else None, "lower is better"),
            ("connect errors", lambda r: r.get("connect_errors"), "should be 0"),
        ],
        "'paced': 10 connection attempts in flight; 'storm': every client at once (one generator process). Each case "
        "on a fresh server; RSS is read 30 s after the last client joined one of 100 rooms.",
    )
    table(
        "6. CPU per delivery at a fixed load",
        "cost",
        [
            ("server CPU-seconds per million deliveries", best(lambda s: s["cpu_s_per_million"]), "lower is better"),
            ("delivered/s", best(lambda s: s["delivered_per_s"]), "should be the load: 100k and 30k"),
            ("p99 latency µs", best(lambda s: s["p99_us"]), "lower is better"),
        ],
        "Fan-out to 5,000 subscribers at 20 publishes/s (100k deliveries/s) and 2,000 rooms x 5 at 6,000 publishes/s "
        "(30k deliveries/s), 10 s each, on one server: a load every target sustains, so CPU per delivery compares "
        "like with like (the allocator A/B).",
    )
    lat = {}
    for (key, t), rs in groups.items():
        if key.startswith("latency"):
            lat.setdefault(t, {})["stalled" if "1%" in key else "clean"] = med(
                [r["best"]["p99_us"] for r in rs if r.get("best")])
    if lat:
        md += ["**p99 with 1% stalled / p99 without** (target <= 1.2)", "", "| target | ratio |", "|---|---|"]
        md += [f"| {t} | {ratio(v.get('stalled'), v.get('clean'))} |" for t, v in sorted(lat.items())]
        md.append("")
    if failed:
        md += ["## Failed runs", ""] + [f"- {r['target']}: {r['label']}" for r in failed] + [""]
    try:
        root = sys.argv[7] if len(sys.argv) > 7 else ""
        commands = sorted({
            re.sub(r"--server-pid \S+", "--server-pid <pid>",
                   re.sub(r"--label \S+( \S+)*? run=\d+", "--label ...", c.strip())).replace(root + "/", "")
            for c in open(commands_path)})
    except FileNotFoundError:
        commands = []
    # Sections written by the other benchmark scripts (scripts/bench-history, scripts/bench-scaleout), newest run.
    import glob, os
    for extra in sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "reports", "*.md"))):
        md += [open(extra).read().rstrip(), ""]
    md += ["## Commands", "", "Run everything with `scripts/bench` (or `scripts/bench --quick` for the smoke). The "
           "generator invocations were:", "", "```"] + commands + ["```", ""]
    md += [f"Raw results: `{path}` (not committed).", ""]
    open(out, "w").write("\n".join(md))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Runs Autobahn cases 1-10, 12 and 13 (or the groups given with --cases) with kosoku against a WebSocket echo endpoint and compares each case's outcome with the
committed expectations (tests/autobahn/expected.json). Exit status: 0 when every case matches, 1 when any differs
(each difference is printed), 2 on a usage or setup problem.

Started by tests/autobahn.rs (which starts the echo gateway); kosoku must be importable (PYTHONPATH=.tools/kosoku,
installed by scripts/autobahn). Cases 12 and 13 test permessage-deflate (issue 27).

The outcome of a case is three values from the Autobahn report: `behavior` (the message exchange), `behaviorClose`
(the closing handshake) and `remoteCloseCode` (the close code the gateway sent). --update rewrites the expectations
from a run, but refuses an outcome that is not acceptable: behavior and behaviorClose must be OK, NON-STRICT,
INFORMATIONAL or UNIMPLEMENTED, except for a close with 1009 (a message or frame over limits.max_message_size /
max_frame_size, the gateway's documented answer).
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import sys
import time
from pathlib import Path

# Autobahn has no group 8 (nor 11); 12 and 13 are compression (permessage-deflate, issue 27).
CASES = [f"{n}.*" for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 13)]
ACCEPTABLE = {"OK", "NON-STRICT", "INFORMATIONAL", "UNIMPLEMENTED"}
SIZE_LIMIT_CLOSE = 1009
FIELDS = ("behavior", "behaviorClose", "remoteCloseCode")


def outcome(result) -> dict:
    return {
        "behavior": result.behavior.value,
        "behaviorClose": result.behavior_close.value,
        "remoteCloseCode": result.remote_close_code,
    }


def acceptable(o: dict) -> bool:
    if o["remoteCloseCode"] == SIZE_LIMIT_CLOSE:
        return True
    return o["behavior"] in ACCEPTABLE and o["behaviorClose"] in ACCEPTABLE


def selected(case_id: str, patterns: list[str]) -> bool:
    return any(fnmatch.fnmatchcase(case_id, p) for p in patterns)


def sort_key(case_id: str) -> list[int]:
    return [int(p) for p in case_id.split(".")]


def write_expected(path: Path, outcomes: dict[str, dict]) -> None:
    # One case per line, so a changed outcome is a one-line diff.
    lines = [
        '  "about": "Autobahn outcome per case (cases 1-10, 12 and 13) for Roomwire\'s echo endpoint with the shipped '
        'limits; see tests/autobahn/run.py and docs/security.md (Conformance). 1009 = message or frame over the size '
        'limit.",',
        '  "cases": {',
    ]
    ids = sorted(outcomes, key=sort_key)
    for i, case_id in enumerate(ids):
        comma = "," if i + 1 < len(ids) else ""
        lines.append(f"    {json.dumps(case_id)}: {json.dumps(outcomes[case_id], sort_keys=False)}{comma}")
    lines.append("  }")
    path.write_text("{\n" + "\n".join(lines) + "\n}\n")


async def run_cases(url: str, cases: list[str], parallelism: int):
    from kosoku import FailureError, run_fuzzingclient

    try:
        return await run_fuzzingclient(url, cases, None, concurrency=parallelism)
    except FailureError as failure:
        # Some cases did not pass (the 1009 closes, at least): their results are in the error.
        return failure.results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", required=True, help="ws:// URL of the echo endpoint")
    ap.add_argument("--expected", required=True, type=Path, help="committed expectations (JSON)")
    ap.add_argument("--out", required=True, type=Path, help="directory for the Autobahn reports")
    ap.add_argument("--parallelism", type=int, default=1, help="cases run at once")
    ap.add_argument("--cases", default=",".join(CASES),
                    help="comma-separated case patterns (default: every group); expectations of cases not run are "
                         "not checked")
    ap.add_argument("--update", action="store_true", help="rewrite --expected from this run")
    args = ap.parse_args()

    try:
        import kosoku  # noqa: F401
    except ImportError:
        print("autobahn: kosoku is not importable: run scripts/autobahn (installs it into .tools/kosoku)",
              file=sys.stderr)
        return 2

    started = time.monotonic()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    results = asyncio.run(run_cases(args.url, cases, args.parallelism))
    elapsed = time.monotonic() - started
    if not results:
        print("autobahn: kosoku returned no results", file=sys.stderr)
        return 2

    args.out.mkdir(parents=True, exist_ok=True)
    try:
        from kosoku._report import write_reports

        write_reports(results, str(args.out))
    except Exception as e:  # the reports are a convenience; the comparison below is the test
        print(f"autobahn: could not write reports: {e}", file=sys.stderr)
    got = {r.case_id: outcome(r) for r in results}
    (args.out / "outcomes.json").write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")

    summary: dict[str, int] = {}
    for o in got.values():
        key = f"{o['behavior']}/{o['behaviorClose']}" + (f" {o['remoteCloseCode']}" if o["remoteCloseCode"] else "")
        summary[key] = summary.get(key, 0) + 1
    print(f"autobahn: {len(got)} cases in {elapsed:.1f}s against {args.url}")
    for key, n in sorted(summary.items(), key=lambda kv: -kv[1]):
        print(f"  {n:4d}  {key}")
    slowest = sorted(results, key=lambda r: -r.duration)[:3]
    print("  slowest: " + ", ".join(f"{r.case_id} {r.duration} ms" for r in slowest))

    unacceptable = sorted((c for c, o in got.items() if not acceptable(o)), key=sort_key)
    if args.update:
        if unacceptable:
            for c in unacceptable:
                print(f"autobahn: refusing to record {c}: {got[c]} is a failure, not a size-limit close",
                      file=sys.stderr)
            return 1
        # A run of some groups only rewrites those groups' expectations.
        kept = {}
        if args.expected.exists():
            kept = {c: o for c, o in json.loads(args.expected.read_text())["cases"].items() if not selected(c, cases)}
        write_expected(args.expected, {**kept, **got})
        print(f"autobahn: wrote {args.expected}")
        return 0

    expected = {c: o for c, o in json.loads(args.expected.read_text())["cases"].items() if selected(c, cases)}
    if not expected:
        print("autobahn: no expectations", file=sys.stderr)
        return 2
    differ = []
    for case_id in sorted(set(expected) | set(got), key=sort_key):
        want, have = expected.get(case_id), got.get(case_id)
        if want is None:
            differ.append(f"{case_id}: not in {args.expected.name}, got {have}")
        elif have is None:
            differ.append(f"{case_id}: expected {want}, case did not run")
        elif any(want.get(f) != have.get(f) for f in FIELDS):
            differ.append(f"{case_id}: expected {want}, got {have}")
    for c in unacceptable:
        if not any(d.startswith(f"{c}:") for d in differ):
            differ.append(f"{c}: {got[c]} is a failure, not a size-limit close (fix expected.json)")
    if differ:
        print(f"autobahn: {len(differ)} case(s) differ from {args.expected}:", file=sys.stderr)
        for d in differ:
            print(f"  {d}", file=sys.stderr)
        print(f"autobahn: reports in {args.out}/index.html", file=sys.stderr)
        return 1
    print(f"autobahn: all {len(got)} cases match {args.expected.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

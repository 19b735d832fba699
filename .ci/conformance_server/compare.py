"""Compare MCP conformance-suite results of the stock session manager and ours (``.ci/conformance``).

Usage: python compare.py RESULTS_ROOT [--require-ours] [--markdown FILE] [--json FILE]

RESULTS_ROOT/<suite version>/<spec mode>/ holds one run of the suite per implementation:
  <impl>/                 the suite's ``-o`` directory: one ``server-<scenario>-<timestamp>/checks.json`` each
  <impl>.status           one word written by .ci/conformance: ok | timeout | not_available | server_error
  scenarios.txt           (optional) every scenario the run should have produced, one a line

A scenario's status, from its checks (the suite's own reading: a scenario is green when none of its
checks is FAILURE or WARNING):
  PASS  no FAILURE/WARNING, at least one SUCCESS      SKIP  no FAILURE/WARNING, no SUCCESS (all SKIPPED/INFO)
  WARN  a WARNING, no FAILURE                         FAIL  a FAILURE
  NONE  no checks.json (the scenario did not finish, or the run stopped)
A regression is a scenario whose stock status is PASS, SKIP or WARN and whose status on ours is worse
(PASS > SKIP > WARN > FAIL > NONE). Scenarios that fail on stock are reported, never a regression.

Exit status: 0 no regression; 1 a regression; 3 a run could not be made (stock not ok, or ours not ok
while --require-ours).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

IMPLS = ("stock", "ours")
RANK = {"PASS": 4, "SKIP": 3, "WARN": 2, "FAIL": 1, "NONE": 0}
GREEN = ("PASS", "SKIP")
# Run statuses whose scenarios are not compared (the run error itself is reported, and fails the job
# unless it is ours being not available without --require-ours). A `timeout` run is compared: the
# scenarios it finished count, the others are NONE.
NO_RESULTS = {
    "not_available": "not available",
    "not_run": "not run",
    "server_error": "server error",
    "budget_exceeded": "not run (time)",
}
DIR_RE = re.compile(r"^server-(?P<name>.+)-\d{4}-\d{2}-\d{2}T\d{2}-\d{2}-\d{2}-\d{3}Z$")


@dataclass
class Scenario:
    status: str
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def counts(self) -> tuple[int, int, int]:
        ok = sum(c.get("status") == "SUCCESS" for c in self.checks)
        bad = sum(c.get("status") == "FAILURE" for c in self.checks)
        warn = sum(c.get("status") == "WARNING" for c in self.checks)
        return ok, bad, warn

    def cell(self) -> str:
        if self.status == "NONE":
            return "NONE"
        ok, bad, warn = self.counts
        text = f"{self.status} {ok}/{ok + bad}"
        return text + (f" +{warn}w" if warn else "")


def scenario_status(checks: list[dict[str, Any]]) -> str:
    statuses = {c.get("status") for c in checks}
    if "FAILURE" in statuses:
        return "FAIL"
    if "WARNING" in statuses:
        return "WARN"
    return "PASS" if "SUCCESS" in statuses else "SKIP"


def load_impl(run_dir: Path, impl: str) -> tuple[str, dict[str, Scenario]]:
    status_file = run_dir / f"{impl}.status"
    if not status_file.exists():
        return "not_run", {}
    run_status = status_file.read_text().strip() or "unknown"
    scenarios: dict[str, Scenario] = {}
    out = run_dir / impl
    if out.is_dir():
        for d in sorted(out.iterdir()):
            m = DIR_RE.match(d.name)
            if not d.is_dir() or not m:
                continue
            try:
                checks = json.loads((d / "checks.json").read_text())
                scenarios[m["name"]] = Scenario(scenario_status(checks), checks)
            except (OSError, ValueError):
                scenarios[m["name"]] = Scenario("NONE")
    return run_status, scenarios


def check_key(c: dict[str, Any]) -> str:
    return str(c.get("id") or c.get("name"))


def lost_checks(stock: Scenario, ours: Scenario) -> list[str]:
    """Checks SUCCESS on stock and not on ours, each with ours' message."""
    ours_by_key = {check_key(c): c for c in ours.checks}
    lines = []
    for c in stock.checks:
        if c.get("status") != "SUCCESS":
            continue
        o = ours_by_key.get(check_key(c))
        if o is None:
            lines.append(f"{check_key(c)}: not reported on ours")
        elif o.get("status") != "SUCCESS":
            msg = o.get("errorMessage") or o.get("description") or ""
            lines.append(f"{check_key(c)} [{o.get('status')}]: {msg}")
    # A check ours FAILs or WARNs that stock did not report at all.
    stock_keys = {check_key(c) for c in stock.checks}
    for key, o in ours_by_key.items():
        if key not in stock_keys and o.get("status") in ("FAILURE", "WARNING"):
            lines.append(f"{key} [{o.get('status')}] (not reported on stock): {o.get('errorMessage') or ''}")
    return lines


def table(rows: list[list[str]], markdown: bool) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    if markdown:
        out = ["| " + " | ".join(rows[0]) + " |", "|" + "|".join("---" for _ in rows[0]) + "|"]
        out += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows[1:]]
        return "\n".join(out)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*rows[0]), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in rows[1:]]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("root", type=Path)
    ap.add_argument("--require-ours", action="store_true")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    # Suite versions in name order; within one, the default spec mode first.
    run_dirs = {p.parent for p in args.root.glob("*/*/*.status")}
    runs = sorted(run_dirs, key=lambda d: (d.parent.name, d.name != "default", d.name))
    if not runs:
        print("compare: no runs found under", args.root, file=sys.stderr)
        return 3

    infra_errors: list[str] = []
    regressions: list[tuple[str, str, str, str, list[str]]] = []
    differences: list[tuple[str, str, str, str]] = []
    wide: dict[str, dict[str, list[str]]] = {}  # scenario -> run label -> [stock cell, ours cell]
    totals = {impl: [0, 0] for impl in IMPLS}  # green, scenarios
    summary: dict[str, dict[str, Any]] = {}

    for run_dir in runs:
        label = f"{run_dir.parent.name} / {run_dir.name}"
        loaded = {impl: load_impl(run_dir, impl) for impl in IMPLS}
        expected_file = run_dir / "scenarios.txt"
        names = set(expected_file.read_text().split()) if expected_file.exists() else set()
        for impl in IMPLS:
            names |= set(loaded[impl][1])
        head = ["scenario", "stock", "ours", "note"]
        rows = [head]
        run_summary: dict[str, dict[str, Any]] = {}
        for impl in IMPLS:
            st = loaded[impl][0]
            if impl == "stock" and st not in ("ok", "not_run"):  # not_run: CONFORMANCE_IMPLS=ours
                infra_errors.append(f"{label}: stock run {st}")
            if impl == "ours" and st not in ("ok", "not_run") and (args.require_ours or st != "not_available"):
                infra_errors.append(f"{label}: ours run {st}")
        for name in sorted(names):
            cells, got = [], {}
            for impl in IMPLS:
                st, scen = loaded[impl]
                if st in NO_RESULTS:
                    cells.append(NO_RESULTS[st])
                    continue
                s = scen.get(name, Scenario("NONE"))
                got[impl] = s
                cells.append(s.cell() + ("" if st == "ok" else f" ({st})"))
                totals[impl][1] += 1
                totals[impl][0] += s.status in GREEN
            note = ""
            if "stock" in got and "ours" in got:
                s, o = got["stock"], got["ours"]
                if s.status != "FAIL" and s.status != "NONE" and RANK[o.status] < RANK[s.status]:
                    note = "REGRESSION"
                    regressions.append((label, name, s.status, o.status, lost_checks(s, o)))
                elif s.status != o.status:
                    note = "differs" if RANK[o.status] < RANK[s.status] else "better on ours"
                    differences.append((label, name, s.status, o.status))
                elif s.counts != o.counts:
                    note = "same status, other counts"
                    differences.append((label, name, s.cell(), o.cell()))
                elif s.status not in GREEN:
                    note = "not green on either"
            elif "stock" in got and got["stock"].status not in GREEN:
                note = "not green on stock"
            rows.append([name, *cells, note])
            run_summary[name] = {impl: got[impl].status for impl in got}
        summary[label] = run_summary
        print(
            f"\n=== suite {run_dir.parent.name}, spec version {run_dir.name} "
            f"(stock: {loaded['stock'][0]}, ours: {loaded['ours'][0]})"
        )
        print(table(rows, markdown=False))
        for r in rows[1:]:
            wide.setdefault(r[0], {})[label] = r[1:3]

    if regressions:
        print("\n=== regressions (passing on stock, not on ours)")
        for label, name, st, ot, lines in regressions:
            print(f"- {label}: {name}: stock {st}, ours {ot}")
            for line in lines:
                print(f"    {line}")
    if differences:
        print("\n=== other differences (not failing the job)")
        for label, name, st, ot in differences:
            print(f"- {label}: {name}: stock {st}, ours {ot}")
    for err in infra_errors:
        print(f"ERROR: {err}")

    parts = []
    for impl in IMPLS:
        green, n = totals[impl]
        parts.append(f"{impl} {green}/{n} scenarios green" if n else f"{impl} not available/not run")
    verdict = "FAIL" if regressions or infra_errors else "OK"
    print(
        f"\nconformance: {verdict}: {len(runs)} runs; {'; '.join(parts)}; "
        f"{len(regressions)} regressions (green on stock, worse on ours); {len(infra_errors)} run errors"
    )

    if args.markdown:
        # One row a scenario, a stock and an ours column a run; "-" where a run has no such scenario.
        labels = [f"{d.parent.name} / {d.name}" for d in runs]
        md_rows = [["scenario"] + [f"{lab}: {impl}" for lab in labels for impl in IMPLS]]
        for name in sorted(wide):
            md_rows.append([name] + [c for lab in labels for c in wide[name].get(lab, ["-", "-"])])
        args.markdown.write_text(table(md_rows, markdown=True) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "regressions": [r[:4] for r in regressions]}, indent=1))
    if infra_errors:
        return 3
    return 1 if regressions else 0


if __name__ == "__main__":
    sys.exit(main())

"""Reads one host run's JUnit report (pytest --junit-xml): prints "passed failed errors skipped", then one line per
host test module with its passed count. Exits 1 when a host test module (tests/host/test_host_*.py) has no passed
test: a run where a whole module skipped, or was never collected (pytest exit code 5), does not verify the host.
(test_pack_import.py in the same folder needs no host, so the overall passed count alone would not show that.)

Usage: python .ci/host_run_check.py REPORT.xml
"""

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

HOST_MODULES = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "tests" / "host").glob("test_host_*.py"))


def main(report: str) -> int:
    try:
        root = ET.parse(report).getroot()
    except (OSError, ET.ParseError) as exc:
        print("0 0 0 0")
        print(f"no readable JUnit report ({exc}): the run did not get going", file=sys.stderr)
        return 1
    outcome: Counter = Counter()
    passed_in: Counter = Counter()
    for tc in root.iter("testcase"):
        tags = {child.tag for child in tc}
        kind = "failed" if "failure" in tags else "errors" if "error" in tags else "skipped" if "skipped" in tags else "passed"
        outcome[kind] += 1
        if kind == "passed":
            passed_in[tc.get("classname", "").rsplit(".", 1)[-1]] += 1
    print(outcome["passed"], outcome["failed"], outcome["errors"], outcome["skipped"])
    missing = [m for m in HOST_MODULES if passed_in[m] == 0]
    for m in HOST_MODULES:
        print(f"  {m}: {passed_in[m]} passed")
    if not HOST_MODULES or missing:
        print(f"host test modules without a passed test: {missing or 'no tests/host/test_host_*.py found'}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

"""Shared test setup: make `labkit` (the lab's code, at the repository root, not installed) importable, and
give each pytest-xdist worker its own lab.

`KSA_TEST_LABS=2 ./scripts/test` runs the lab tests on two labs side by side
(``KSA_TEST_LAB_INSTANCES="0 1"``, `-n 2`; one lab is the default, docs/lab.md says why): worker gwN drives
the Nth instance (labkit/layout.py: its own directory, bridge, subnet and namespaces), so that no two cases
ever share hosts, agents or a bridge's counters. Set here, before anything imports labkit, whose layout
reads ``KSA_LAB_INSTANCE`` once.
"""

import os
import sys
from pathlib import Path

_REPO = str(Path(__file__).resolve().parent.parent)
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)


def _worker_lab() -> None:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    instances = os.environ.get("KSA_TEST_LAB_INSTANCES", "").split()
    if not worker.startswith("gw") or not instances:
        return
    index = int(worker[2:])
    if index >= len(instances):
        raise SystemExit(
            f"pytest worker {worker} has no lab: KSA_TEST_LAB_INSTANCES={' '.join(instances)} names "
            f"{len(instances)}; run as many workers (-n) as labs"
        )
    os.environ["KSA_LAB_INSTANCE"] = instances[index]


_worker_lab()

"""``python -m agent``: the same entry point as the ``kvm-storage-agent`` console script."""

from agent.cli import main

raise SystemExit(main())

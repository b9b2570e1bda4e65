"""`scripts/guest-safety`: does a live migration harm the guest it moves (issue 21, point 2)? Cells of
plain `virsh migrate` with the agent's calls replayed by hand, and cells of the agent itself (with an agent
kill in the memory phase), each run cross host on a 128 MiB guest that dirties memory and checks its own
(labkit/memcheck.c). Per run: the verdict against where the VM runs, stale pages, guest deaths, downtime."""

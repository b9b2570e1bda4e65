"""`scripts/bench`: where the agent stands against virsh, qemu-img, naive libvirt and the physical limit,
measured side by side in one run on the lab (issue 7). Results: a Markdown table, a JSON file and a plot
of one live migration's progress. See docs/performance.md."""

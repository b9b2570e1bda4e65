"""labkit: the two-hypervisor lab on one machine (``scripts/lab``).

Each lab host is a set of namespaces (network, mount, UTS) with its own libvirtd, virtlogd and agent, on a
bridge in the root namespace. The package uses only the standard library and the system tools (ip, unshare,
nsenter, virsh, qemu-img), so the lab keeps working whatever state the agent's virtualenv is in.

Modules, lower layers first: ``layout`` (the fixed shape), ``sysutil`` (processes), ``state`` (what an
``up`` decided, kept across runs), ``network``, ``holder`` (the process that keeps a host's namespaces and
reaps its children), ``hostsetup`` (mounts, libvirt config and daemons), ``agentctl``, ``lab`` (up, down,
status); for guests ``records`` (on-disk record format, acks, verification), ``image`` (kernel and
initramfs), ``domain`` (XML and virsh), ``guests``; ``cli`` on top.
"""

"""labkit: the two-hypervisor lab on one machine (``scripts/lab``).

Each lab host is a set of namespaces (network, mount, UTS) with its own libvirtd, virtlogd and agent, on a
bridge in the root namespace. The lab's own modules use only the standard library and the system tools
(ip, unshare, nsenter, virsh, qemu-img), so the lab keeps working whatever state the agent's virtualenv is in.

Modules, lower layers first: ``layout`` (the fixed shape), ``sysutil`` (processes), ``state`` (what an
``up`` decided, kept across runs), ``network``, ``holder`` (the process that keeps a host's namespaces and
reaps its children), ``hostsetup`` (mounts, libvirt config and daemons), ``agentctl``, ``lab`` (up, down,
status); ``virsh`` (the one virsh wrapper: a URI or a lab host); for guests ``records`` (on-disk record
format, acks, verification), ``image`` (kernel and initramfs), ``domain`` (XML, where a domain is),
``guestdir`` (a guest's record, console and acks), ``guestcreate``, ``guests`` (verify, destroy, list);
``guestcli`` and ``cli`` on top.

For the lab tests and the benchmark alike, never imported by the lab's own commands: ``bodies`` (request
bodies), ``waits``, and two modules that need the agent's virtualenv: ``agents`` (clients of the lab's
agents, the lab CA) and ``mgmtplane`` (a stand-in management plane recording callbacks).
"""

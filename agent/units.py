"""Units the agent counts in: bytes, with libvirt and QEMU speaking MiB here and there."""

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

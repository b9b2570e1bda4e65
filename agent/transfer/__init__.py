"""Image transfer between hosts (qemu-storage-daemon, NBD)."""

"""kvm-storage-agent: moves running KVM virtual machines' storage."""

__version__ = "0.1.0"

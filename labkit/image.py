"""The test guest's kernel and initramfs, built from Debian packages and cached in /var/cache/ksa-lab.

Kernel: linux-image-cloud-amd64's dependency (apt-get download + dpkg-deb -x); its virtio drivers are
modules, which the init script loads. Userland: busybox-static, guest_init.sh and the memory checker
(memcheck.c, compiled static with gcc here), packed with cpio. The initramfs is named after a hash of its
inputs (the checker's source among them), so a changed init script or checker gives a new file and guests
that are already defined keep theirs.
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .layout import CACHE_DIR
from .sysutil import LabError, log, run

IMAGE_DIR = CACHE_DIR / "guest"
INIT_SCRIPT = Path(__file__).with_name("guest_init.sh")
MEMCHECK_SOURCE = Path(__file__).with_name("memcheck.c")
MEMCHECK_BINARY = "bin/ksa-memcheck"  # in the initramfs
META_PACKAGE = "linux-image-cloud-amd64"
# The drivers a guest needs for its virtio disks; the load order comes from each module's `depends=`
# (it changes between kernel builds: in 6.1.0-56 virtio needs virtio_ring, unlike older notes say).
MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)
BUSYBOX_CANDIDATES = (Path("/bin/busybox"), Path("/usr/bin/busybox"))


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    version: str


def ensure_image() -> GuestImage:
    """The cached kernel and initramfs, building whichever is missing (locked: tests may run in parallel)."""
    IMAGE_DIR.mkdir(parents=True, exist_ok=True)
    with (IMAGE_DIR / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        kernel_dir = _cached_kernel() or _fetch_kernel()
        initrd = _ensure_initrd(kernel_dir)
    return GuestImage(
        kernel=kernel_dir / "vmlinuz", initrd=initrd, version=kernel_dir.name.removeprefix("kernel-")
    )


def _cached_kernel() -> Path | None:
    ready = sorted(p.parent for p in IMAGE_DIR.glob("kernel-*/.complete"))
    return ready[-1] if ready else None


def _kernel_package() -> str:
    """The versioned image package the meta package depends on, e.g. linux-image-6.1.0-56-cloud-amd64."""
    for attempt in range(2):
        proc = run(["apt-cache", "depends", META_PACKAGE], check=False)
        for line in proc.stdout.splitlines():
            name = line.strip().removeprefix("Depends:").strip()
            if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
                return name
        if attempt == 0:
            log("apt knows no kernel package yet: apt-get update")
            run(["apt-get", "update", "-q"], timeout=600)
    raise LabError(f"cannot find the kernel package that {META_PACKAGE} depends on")


def _fetch_kernel() -> Path:
    package = _kernel_package()
    log(f"building the guest kernel from {package} (once; cached in {IMAGE_DIR})")
    with tempfile.TemporaryDirectory(dir=IMAGE_DIR) as tmp:
        work = Path(tmp)
        # apt-get download writes to the current directory.
        run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package], timeout=600, cwd=work)
        debs = list(work.glob(f"{package}_*.deb"))
        if not debs:
            raise LabError(f"apt-get download {package} produced no .deb")
        deb = debs[0]
        run(["dpkg-deb", "-x", deb, work / "root"])
        vmlinuz = sorted((work / "root" / "boot").glob("vmlinuz-*"))
        if not vmlinuz:
            raise LabError(f"{deb.name} has no boot/vmlinuz-*")
        version = vmlinuz[-1].name.removeprefix("vmlinuz-")
        target = IMAGE_DIR / f"kernel-{version}"
        shutil.rmtree(target, ignore_errors=True)
        (target / "modules").mkdir(parents=True)
        shutil.copy2(vmlinuz[-1], target / "vmlinuz")
        for module in MODULES:
            found = list((work / "root").glob(f"lib/modules/*/kernel/**/{module}.ko"))
            if found:  # absent means built in
                shutil.copy2(found[0], target / "modules" / f"{module}.ko")
        (target / ".complete").write_text(package + "\n")
    return target


def _busybox() -> Path:
    for candidate in BUSYBOX_CANDIDATES:
        if candidate.exists() and _is_static_elf(candidate):
            return candidate
    raise LabError("no static busybox (install busybox-static: run scripts/setup)")


def _is_static_elf(path: Path) -> bool:
    """An x86-64 ELF without a PT_INTERP program header needs no loader: it runs in the bare initramfs."""
    data = path.read_bytes()
    if data[:5] != b"\x7fELF\x02":
        return False
    phoff = int.from_bytes(data[0x20:0x28], "little")
    phentsize = int.from_bytes(data[0x36:0x38], "little")
    phnum = int.from_bytes(data[0x38:0x3A], "little")
    pt_interp = 3
    return all(
        int.from_bytes(data[phoff + i * phentsize : phoff + i * phentsize + 4], "little") != pt_interp
        for i in range(phnum)
    )


def module_load_order(modules: list[Path]) -> list[Path]:
    """Modules sorted so that each comes after the modules it depends on (from its .modinfo section)."""
    by_name = {m.name.removesuffix(".ko"): m for m in modules}
    deps = {}
    for name, path in by_name.items():
        data = path.read_bytes()
        start = data.find(b"\0depends=")
        value = data[start + 9 : data.index(b"\0", start + 1)].decode() if start >= 0 else ""
        deps[name] = [d.replace("-", "_") for d in value.split(",") if d]
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order or name not in by_name:
            return
        if name in path:
            raise LabError(f"module dependency cycle: {' -> '.join((*path, name))}")
        for dep in deps[name]:
            visit(dep, (*path, name))
        order.append(name)

    for name in sorted(by_name):
        visit(name, ())
    return [by_name[n] for n in order]


def _ensure_initrd(kernel_dir: Path) -> Path:
    busybox = _busybox()
    modules = module_load_order(sorted((kernel_dir / "modules").glob("*.ko")))
    digest = hashlib.sha256()
    for path in (INIT_SCRIPT, MEMCHECK_SOURCE, busybox, *modules):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    initrd = IMAGE_DIR / f"initrd-{digest.hexdigest()[:16]}.img"
    if initrd.exists():
        return initrd
    log(f"building the guest initramfs {initrd.name}")
    with tempfile.TemporaryDirectory(dir=IMAGE_DIR) as tmp:
        tree = Path(tmp) / "tree"
        (tree / "bin").mkdir(parents=True)
        (tree / "lib" / "modules").mkdir(parents=True)
        shutil.copy2(busybox, tree / "bin" / "busybox")
        shutil.copy2(INIT_SCRIPT, tree / "init")
        _compile_memcheck(tree / MEMCHECK_BINARY)
        (tree / "init").chmod(0o755)
        for module in modules:
            shutil.copy2(module, tree / "lib" / "modules" / module.name)
        (tree / "lib" / "modules" / "load-order").write_text("".join(f"{m.name}\n" for m in modules))
        files = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
        listing = ".\n" + "".join(f"./{name}\n" for name in files)
        partial = Path(tmp) / "initrd.img"
        with partial.open("wb") as out:
            cpio = subprocess.Popen(
                ["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"],
                cwd=tree,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            gzip = subprocess.Popen(["gzip", "-9", "-n"], stdin=cpio.stdout, stdout=out)
            assert cpio.stdin is not None and cpio.stdout is not None
            cpio.stdout.close()
            cpio.stdin.write(listing.encode())
            cpio.stdin.close()
            if cpio.wait() != 0 or gzip.wait() != 0:
                raise LabError("packing the initramfs failed (cpio | gzip)")
        partial.replace(initrd)
    return initrd


def _compile_memcheck(target: Path) -> None:
    """The memory checker as a static binary: the initramfs has no C library."""
    if shutil.which("gcc") is None:
        raise LabError("no gcc to build the guest's memory checker (run scripts/setup)")
    proc = run(["gcc", "-static", "-O2", "-Wall", "-o", target, MEMCHECK_SOURCE], check=False)
    if proc.returncode != 0 or not target.exists() or not _is_static_elf(target):
        raise LabError(
            f"building {MEMCHECK_SOURCE.name} (gcc -static) failed; libc6-dev installed? (scripts/setup):"
            f"\n{proc.stderr.strip()}"
        )

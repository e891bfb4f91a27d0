"""The size of every host task's XSAVE buffer on the running kernel, which no user interface
reports: fpu_kernel_cfg.default_size, read back out of the task_struct slab cache.

Theory of operation
-------------------
fpu__init_task_struct_size() (arch/x86/kernel/fpu/init.c) sizes the task_struct cache once at
boot: ``arch_task_struct_size = sizeof(struct task_struct) + sizeof(struct fpu) -
sizeof(union fpregs_state) + fpu_kernel_cfg.default_size`` -- struct fpu follows the task, and
its static 4096-byte register union is replaced by the buffer the boot sizing computed.
fork_init() (kernel/fork.c) creates the "task_struct" cache with that object size, which SLUB
shows in /sys/kernel/slab/task_struct/object_size (root only). The three C sizes come from
the kernel's own type information, /sys/kernel/btf/vmlinux, read with bpftool (Debian package
bpftool). The difference is the buffer every host thread carries: since v6.17 without the
guest-only CET supervisor state (seed 001), 24 bytes less than the boot log's "context size".
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

from fpstate.errors import HostUnavailable

BTF_VMLINUX = Path("/sys/kernel/btf/vmlinux")
SLAB_OBJECT_SIZE = Path("/sys/kernel/slab/task_struct/object_size")
#: The C types fpu__init_task_struct_size() adds and subtracts.
TYPES = (("STRUCT", "task_struct"), ("STRUCT", "fpu"), ("UNION", "fpregs_state"))
_RAW = re.compile(r"^\[\d+\] (STRUCT|UNION) '([^']+)' size=(\d+) ")


def _bpftool() -> str | None:
    return shutil.which("bpftool") or next(
        (p for p in ("/usr/sbin/bpftool", "/sbin/bpftool") if os.access(p, os.X_OK)), None)


def _btf_unavailable() -> str | None:
    if not BTF_VMLINUX.exists():
        return f"{BTF_VMLINUX} does not exist: the kernel was built without CONFIG_DEBUG_INFO_BTF"
    if _bpftool() is None:
        return "bpftool is not installed (Debian package bpftool)"
    return None


def task_size_unavailable() -> str | None:
    """Why `kernel_default_size` cannot be measured here (without running bpftool), or None."""
    why = _btf_unavailable()
    if why:
        return why
    if not SLAB_OBJECT_SIZE.exists():
        return f"{SLAB_OBJECT_SIZE} does not exist (no SLUB sysfs, or the cache was merged)"
    if not os.access(SLAB_OBJECT_SIZE, os.R_OK):
        return f"{SLAB_OBJECT_SIZE} is readable by root only"
    return None


def btf_sizes(wanted: tuple[tuple[str, str], ...] = TYPES) -> dict[str, int]:
    """sizeof() of each (kind, name) of ``wanted`` in the running kernel's BTF, by ``bpftool
    btf dump file /sys/kernel/btf/vmlinux format raw``. HostUnavailable where the kernel has
    no BTF, bpftool is missing, or a type is absent or named twice with two sizes."""
    why = _btf_unavailable()
    if why:
        raise HostUnavailable(why)
    argv = [str(_bpftool()), "btf", "dump", "file", str(BTF_VMLINUX), "format", "raw"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if run.returncode != 0:
        raise HostUnavailable(f"bpftool btf dump failed: {run.stderr.strip()[:120]}")
    keys = set(wanted)
    found: dict[str, set[int]] = {}
    for line in run.stdout.splitlines():
        m = _RAW.match(line)
        if m and (m.group(1), m.group(2)) in keys:
            found.setdefault(m.group(2), set()).add(int(m.group(3)))
    sizes = {}
    for kind, name in wanted:
        got = found.get(name, set())
        if len(got) != 1:
            raise HostUnavailable(f"the kernel's BTF has {len(got)} sizes for {kind.lower()} "
                                  f"{name}: {sorted(got)}")
        sizes[name] = got.pop()
    return sizes


def task_struct_object_size() -> int:
    """The task_struct cache's object size, arch_task_struct_size (SLUB's sysfs; root only)."""
    try:
        text = SLAB_OBJECT_SIZE.read_text()
        return int(text)
    except ValueError:
        raise HostUnavailable(f"{SLAB_OBJECT_SIZE} holds {text.strip()[:40]!r}, not a "
                              "size") from None
    except FileNotFoundError:
        raise HostUnavailable(f"{SLAB_OBJECT_SIZE} does not exist (no SLUB sysfs, or the "
                              "cache was merged)") from None
    except PermissionError:
        raise HostUnavailable(f"{SLAB_OBJECT_SIZE} is readable by root only") from None


def kernel_default_size() -> int:
    """fpu_kernel_cfg.default_size of the running kernel: arch_task_struct_size minus the
    fixed parts fpu__init_task_struct_size() adds to it."""
    sizes = btf_sizes()
    return (task_struct_object_size() - sizes["task_struct"] - sizes["fpu"]
            + sizes["fpregs_state"])

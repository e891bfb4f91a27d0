"""fpu_kernel_cfg.default_size read back out of the running kernel (fpstate.host.task_size).

The reader of bpftool's BTF dump is tested everywhere with fixed outputs (a missing tool, a
missing or ambiguous type). On the host, the size of every task's XSAVE buffer, recovered from
the task_struct cache and the kernel's BTF, is the model's fpu_kernel_cfg.default_size for
this CPU and kernel -- and, where the CPU has guest-only supervisor state (CET_S, seed 001),
not the size the rejected design gives every host task.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fpstate.errors import HostUnavailable
from fpstate.host import native, task_size
from fpstate.kernel.x86.versions import version_for_release
from fpstate.kernel.x86.xstate import fpu__init_system_xstate
from fpstate.x86.xfeatures import XFEATURE_MASK_CET_KERNEL

RAW = """\
[1] INT 'long unsigned int' size=8 bits_offset=0 nr_bits=64 encoding=(none)
[114] STRUCT 'task_struct' size=3264 vlen=248
\t'thread_info' type_id=115 bits_offset=0
[4551] UNION 'fpregs_state' size=4096 vlen=5
[4553] STRUCT 'fpstate' size=4160 vlen=10
[7576] STRUCT 'fpu' size=4224 vlen=7
[7577] FWD 'fpu' fwd_kind=struct
"""


def _fake_bpftool(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, out: str,
                  rc: int = 0) -> None:
    monkeypatch.setattr(task_size.shutil, "which", lambda name: "/usr/sbin/bpftool")
    vmlinux = tmp_path / "vmlinux"
    vmlinux.write_bytes(b"\x9f\xeb")
    monkeypatch.setattr(task_size, "BTF_VMLINUX", vmlinux)

    def run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
        assert argv[1:] == ["btf", "dump", "file", str(vmlinux), "format", "raw"]
        return subprocess.CompletedProcess(argv, rc, out, "libbpf: no BTF" if rc else "")

    monkeypatch.setattr(task_size.subprocess, "run", run)


def test_btf_sizes_reads_struct_and_union_sizes(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path: Path) -> None:
    _fake_bpftool(monkeypatch, tmp_path, RAW)
    assert task_size.btf_sizes() == {"task_struct": 3264, "fpu": 4224, "fpregs_state": 4096}


@pytest.mark.parametrize("out, rc, message", [
    (RAW.replace("[7576] STRUCT 'fpu' size=4224 vlen=7\n", ""), 0, "0 sizes for struct fpu"),
    (RAW + "[9000] STRUCT 'fpu' size=4288 vlen=7\n", 0, r"2 sizes for struct fpu: \[4224, 4288\]"),
    (RAW.replace("UNION 'fpregs_state'", "STRUCT 'fpregs_state'"), 0,
     "0 sizes for union fpregs_state"),
    ("", 255, "bpftool btf dump failed: libbpf: no BTF"),
])
def test_btf_sizes_refuses_what_it_cannot_answer(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path, out: str, rc: int,
                                                 message: str) -> None:
    _fake_bpftool(monkeypatch, tmp_path, out, rc)
    with pytest.raises(HostUnavailable, match=message):
        task_size.btf_sizes()


def test_no_bpftool_or_no_btf_is_a_reason(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    monkeypatch.setattr(task_size, "BTF_VMLINUX", tmp_path / "vmlinux")
    with pytest.raises(HostUnavailable, match="without CONFIG_DEBUG_INFO_BTF"):
        task_size.btf_sizes()
    (tmp_path / "vmlinux").write_bytes(b"")
    monkeypatch.setattr(task_size.shutil, "which", lambda name: None)
    monkeypatch.setattr(task_size.os, "access", lambda path, mode: False)
    with pytest.raises(HostUnavailable, match="bpftool is not installed"):
        task_size.btf_sizes()


def test_an_unreadable_slab_is_a_reason(monkeypatch: pytest.MonkeyPatch,
                                        tmp_path: Path) -> None:
    monkeypatch.setattr(task_size, "SLAB_OBJECT_SIZE", tmp_path / "object_size")
    with pytest.raises(HostUnavailable, match="does not exist"):
        task_size.task_struct_object_size()
    (tmp_path / "object_size").write_text("five\n")
    with pytest.raises(HostUnavailable, match="holds 'five', not a size"):
        task_size.task_struct_object_size()
    (tmp_path / "object_size").write_text("5840\n")
    assert task_size.task_struct_object_size() == 5840


@pytest.mark.host
def test_every_host_task_carries_the_models_default_size() -> None:
    """arch_task_struct_size - sizeof(task_struct) - sizeof(struct fpu) + sizeof(union
    fpregs_state) on the running kernel equals fpu__init_system_xstate()'s
    fpu_kernel_cfg.default_size for this CPU and kernel. Where the CPU enumerates CET_S, which
    Linux 6.17 made guest-only (seed 001), it is below fpu_kernel_cfg.max_size -- the boot
    log's "context size" -- by CET_S's 24 bytes, and the rejected design's size (variant
    guest-only-in-host-fpstate, CET_S in every host fpstate) is not what the kernel allocates.
    """
    if not native.is_x86_64():
        pytest.skip("the host is not x86-64")
    try:
        measured = task_size.kernel_default_size()
        from fpstate.x86.profiles import load_profile

        host = load_profile("host")
    except HostUnavailable as e:
        pytest.skip(str(e))
    kernel = version_for_release(os.uname().release)
    boot = fpu__init_system_xstate(host, kernel)
    k = boot.fpu_kernel_cfg
    assert measured == k.default_size
    if not k.max_features & XFEATURE_MASK_CET_KERNEL:
        return
    from fpstate.kvm.x86.vcpu import model_system

    rejected = model_system(host, frozenset({"guest-only-in-host-fpstate"}), kernel.name)
    assert k.max_size - measured == 24 == rejected.kernel.default_size - measured

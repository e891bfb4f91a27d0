"""arch_prctl(ARCH_*_XCOMP_*) permissions and the sigaltstack interplay, in the model.

Host numbers are the ones fpstate.host measured on this machine (tests/host/test_prctl.py,
test_signals.py): SUPP = PERM = GUEST_PERM = XCR0 = 0xe7, every REQ errno, EFAULT for bad
pointers, EINVAL for unknown options, the sigaltstack errno table.
"""

from __future__ import annotations

import pytest

from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.process import sys_clone, sys_execve
from fpstate.kernel.x86.sched import (
    SS_AUTODISARM,
    SS_DISABLE,
    SS_ONSTACK,
    Machine,
    Task,
)
from fpstate.kernel.x86.signal import fpu__get_fpstate_size, get_sigframe_size
from fpstate.kernel.x86.types import CLONE_THREAD, CLONE_VM, FPU_GUEST_PERM_LOCKED
from fpstate.tools.template import guest_profile
from fpstate.x86.layout import compacted_size, standard_size
from fpstate.x86.profiles import load_profile

XTILE_DATA = 1 << 18
CLONE_SIGHAND = 0x800


#: The KVM guest this project was first measured on (sessions 1-13): a Zen 5 whose VMM
#: offered XCR0 0xe7 and IA32_XSS 0x1800 (no PKRU; standard size 2432). The model's answers
#: for it are pinned here, whatever CPU runs the tests.
ZEN5_VM = guest_profile(load_profile("zen5"), 0xE7, 0x1800)


def host_machine() -> Machine:
    m = Machine.boot(ZEN5_VM)
    assert m.system.user.max_features == 0xE7 and m.system.user.max_size == 2432
    return m


@pytest.fixture
def spr() -> Machine:
    return Machine.boot("sapphire-rapids")


def start(m: Machine, nr: int = 0) -> Task:
    t = m.spawn()
    m.run(nr, t)
    return t


def prctl(m: Machine, nr: int, option: int, arg2: int = 0) -> int:
    return m.syscall(nr, xp.sys_arch_prctl, option, arg2)


def get(m: Machine, nr: int, option: int) -> int:
    """A GET option into a fresh user page; the u64 it wrote."""
    t = m.cpus[nr].current
    addr = m.mmap(t, 4096)
    assert prctl(m, nr, option, addr) == 0
    return int.from_bytes(t.process.mm.read(addr, 8), "little")


def sigaltstack(m: Machine, nr: int, size: int, flags: int = 0) -> int:
    t = m.cpus[nr].current
    sp = m.mmap(t, max(size, 1)) if size else 0
    return m.syscall(nr, xp.sys_sigaltstack, sp, size, flags)


# -- the host (no AMX, no XFD) -------------------------------------------------------------------

def test_host_get_options_are_xcr0() -> None:
    m = host_machine()
    start(m)
    assert get(m, 0, xp.ARCH_GET_XCOMP_SUPP) == 0xE7
    assert get(m, 0, xp.ARCH_GET_XCOMP_PERM) == 0xE7
    assert get(m, 0, xp.ARCH_GET_XCOMP_GUEST_PERM) == 0xE7


def test_host_request_errnos() -> None:
    """idx >= 20 -> EINVAL; any other number (XTILE_CFG, SSE) -> EOPNOTSUPP; XTILE_DATA is
    not in fpu_user_cfg.max_features here -> EOPNOTSUPP; for both REQ options."""
    m = host_machine()
    start(m)
    for option in (xp.ARCH_REQ_XCOMP_PERM, xp.ARCH_REQ_XCOMP_GUEST_PERM):
        for idx, want in ((20, xp.EINVAL), (63, xp.EINVAL), (2**64 - 1, xp.EINVAL),
                          (17, xp.EOPNOTSUPP), (1, xp.EOPNOTSUPP), (18, xp.EOPNOTSUPP)):
            assert prctl(m, 0, option, idx) == -want, (option, idx)
    assert get(m, 0, xp.ARCH_GET_XCOMP_PERM) == 0xE7


def test_host_bad_pointer_and_unknown_option() -> None:
    m = host_machine()
    start(m)
    assert [prctl(m, 0, o, 0) for o in (xp.ARCH_GET_XCOMP_SUPP, xp.ARCH_GET_XCOMP_PERM,
                                         xp.ARCH_GET_XCOMP_GUEST_PERM)] == [-xp.EFAULT] * 3
    assert prctl(m, 0, xp.ARCH_GET_XCOMP_GUEST_PERM, 0xFFFF800000000000) == -xp.EFAULT
    assert prctl(m, 0, 0x1026) == -xp.EINVAL and prctl(m, 0, 0x1020) == -xp.EINVAL


def test_host_sigaltstack_errno_table() -> None:
    """do_sigaltstack: < MINSIGSTKSZ -> ENOMEM; bad mode -> EINVAL; without dynamic features
    and without strict_sas_size any size >= 2048 is accepted (the table helper G measured)."""
    m = host_machine()
    start(m)
    got = [sigaltstack(m, 0, 2047), sigaltstack(m, 0, 2048), sigaltstack(m, 0, 0),
           sigaltstack(m, 0, 100, SS_ONSTACK), sigaltstack(m, 0, 4096, 4),
           sigaltstack(m, 0, 4096, SS_AUTODISARM), sigaltstack(m, 0, 0, SS_DISABLE),
           m.syscall(0, xp.sys_sigaltstack, 0x1000, 1 << 40)]  # only recorded
    assert got == [-xp.ENOMEM, 0, -xp.ENOMEM, -xp.ENOMEM, -xp.EINVAL, 0, 0, 0]


def test_strict_sigaltstack_size_rejects_small_stacks_on_the_host() -> None:
    """strict_sas_size=1: fsize = max_frame_size - fpu__get_fpstate_size() + user default
    size = 3376 - 2548 + 2432 = 3260; the stack must be larger."""
    m = Machine.boot(ZEN5_VM, strict_sigaltstack_size=True)
    start(m)
    assert get_sigframe_size(m.system) - fpu__get_fpstate_size(m.system) + 2432 == 3260
    assert sigaltstack(m, 0, 3260) == -xp.ENOMEM
    assert sigaltstack(m, 0, 3261) == 0


# -- Sapphire Rapids (AMX, XFD) -------------------------------------------------------------------

def test_spr_defaults_and_grant(spr: Machine) -> None:
    """Defaults exclude XTILE_DATA (bit 18) but include XTILE_CFG (17); the grant stores the
    group's sizes: compacted for the kernel buffer, standard for the UABI."""
    t = start(spr)
    assert get(spr, 0, xp.ARCH_GET_XCOMP_SUPP) == 0x602E7
    assert get(spr, 0, xp.ARCH_GET_XCOMP_PERM) == 0x202E7
    assert get(spr, 0, xp.ARCH_GET_XCOMP_GUEST_PERM) == 0x202E7
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_PERM, 17) == -xp.EOPNOTSUPP
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    assert get(spr, 0, xp.ARCH_GET_XCOMP_PERM) == 0x602E7
    perm = t.fpu.perm
    assert perm.state_perm == 0x60EE7  # PKRU, PASID and CET_USER kept (d8414603b29f)
    assert perm.state_size == compacted_size(spr.system.profile, 0x60EE7) == 10752
    assert perm.user_state_size == standard_size(spr.system.profile, 0x602E7) == 11008
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == 0  # sticky, and idempotent
    assert get(spr, 0, xp.ARCH_GET_XCOMP_GUEST_PERM) == 0x202E7  # separate


def test_v5_16_request_revoked_the_default_permission() -> None:
    """Variant req-perm-overwrites (fixed by 063452fd94d1): the grant stores the requested
    bit alone, so ARCH_GET_XCOMP_PERM drops the defaults it reported before; the sizes are
    still those of the whole mask, and the tiles are still permitted."""
    m = Machine.boot("sapphire-rapids", variants={"req-perm-overwrites"})
    t = start(m)
    assert get(m, 0, xp.ARCH_GET_XCOMP_PERM) == 0x202E7
    assert prctl(m, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    assert get(m, 0, xp.ARCH_GET_XCOMP_PERM) == 0x40000
    assert t.fpu.perm.state_perm == 0x40000
    assert t.fpu.perm.state_size == compacted_size(m.system.profile, 0x60EE7)


@pytest.mark.parametrize("kernel", ["5.16", "5.17"])
def test_guest_permission_options_come_with_v5_17(kernel: str) -> None:
    """980fe2fddcff (v5.17, versions row kvm_amx) added the two GUEST options; before it they
    are unknown options (-EINVAL, before the pointer is looked at: EFAULT after)."""
    m = Machine.boot("sapphire-rapids", kernel=kernel)
    start(m)
    old = kernel == "5.16"
    assert prctl(m, 0, xp.ARCH_GET_XCOMP_GUEST_PERM, 0) == (-xp.EINVAL if old else -xp.EFAULT)
    assert prctl(m, 0, xp.ARCH_REQ_XCOMP_GUEST_PERM, 18) == (-xp.EINVAL if old else 0)
    assert prctl(m, 0, xp.ARCH_GET_XCOMP_PERM, 0) == -xp.EFAULT
    assert prctl(m, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == 0


def test_spr_guest_permission_keeps_cet_kernel_and_locks(spr: Machine) -> None:
    """guest_perm starts at guest_default_cfg (CET_KERNEL included, invisible to GET); a vCPU
    locks it: later changes -> EBUSY, an already granted request still 0."""
    t = start(spr)
    assert t.fpu.guest_perm.state_perm == 0x21EE7
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0
    assert t.fpu.guest_perm.state_perm == 0x61EE7
    assert t.fpu.guest_perm.state_size == compacted_size(spr.system.profile, 0x61EE7)
    assert get(spr, 0, xp.ARCH_GET_XCOMP_GUEST_PERM) == 0x602E7
    spr.enter_kernel(0)
    xp.fpu_lock_guest_permissions(spr.cpus[0])
    spr.exit_to_user_mode(0)
    assert t.fpu.guest_perm.state_perm & FPU_GUEST_PERM_LOCKED
    assert get(spr, 0, xp.ARCH_GET_XCOMP_GUEST_PERM) == 0x602E7  # bit 63 never shows
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_GUEST_PERM, 18) == 0


def test_spr_locked_guest_permission_refuses_a_new_feature(spr: Machine) -> None:
    start(spr)
    spr.enter_kernel(0)
    xp.fpu_lock_guest_permissions(spr.cpus[0])
    spr.exit_to_user_mode(0)
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_GUEST_PERM, 18) == -xp.EBUSY
    assert get(spr, 0, xp.ARCH_GET_XCOMP_GUEST_PERM) == 0x202E7
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == 0  # the host permission is separate


def test_permissions_are_process_wide(spr: Machine) -> None:
    leader = start(spr)
    thread = spr.syscall(0, sys_clone, CLONE_THREAD | CLONE_VM | CLONE_SIGHAND)
    spr.run(1, thread)
    assert prctl(spr, 1, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    assert leader.fpu.perm.state_perm & XTILE_DATA
    assert not thread.fpu.perm.state_perm & XTILE_DATA  # the leader's copy is the truth
    assert get(spr, 0, xp.ARCH_GET_XCOMP_PERM) == 0x602E7


def test_fork_inherits_and_exec_resets(spr: Machine) -> None:
    start(spr)
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    child = spr.syscall(0, sys_clone, 0)
    spr.run(1, child)
    assert get(spr, 1, xp.ARCH_GET_XCOMP_PERM) == 0x602E7
    assert spr.syscall(1, sys_execve, "new") == 0
    assert get(spr, 1, xp.ARCH_GET_XCOMP_PERM) == 0x202E7
    assert get(spr, 0, xp.ARCH_GET_XCOMP_PERM) == 0x602E7


def test_spr_sigaltstack_formulas(spr: Machine) -> None:
    """validate_sigaltstack: framesize = 11952 - 11008 + 11008 = 11952, a stack *smaller*
    than it -> ENOSPC. sigaltstack_size_valid after the grant: fsize = 11952 - 11124 + 11008
    = 11836, the size must be *larger*. Before the grant fsize = 11952 - 11124 + 2816 = 3644,
    but without a dynamic permission (and not strict) small stacks pass."""
    assert get_sigframe_size(spr.system) == 11952
    assert fpu__get_fpstate_size(spr.system) == 11124
    start(spr)
    assert sigaltstack(spr, 0, 4096) == 0
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == -xp.ENOSPC
    assert get(spr, 0, xp.ARCH_GET_XCOMP_PERM) == 0x202E7
    assert sigaltstack(spr, 0, 11951) == 0
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == -xp.ENOSPC
    assert sigaltstack(spr, 0, 11952) == 0
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    assert sigaltstack(spr, 0, 8192) == -xp.ENOMEM
    assert sigaltstack(spr, 0, 11836) == -xp.ENOMEM
    assert sigaltstack(spr, 0, 11837) == 0
    assert sigaltstack(spr, 0, 0, SS_DISABLE) == 0


def test_enospc_counts_every_thread_of_the_group(spr: Machine) -> None:
    start(spr)
    thread = spr.syscall(0, sys_clone, CLONE_THREAD | CLONE_VM | CLONE_SIGHAND)
    spr.run(1, thread)
    assert sigaltstack(spr, 1, 8192) == 0
    assert prctl(spr, 0, xp.ARCH_REQ_XCOMP_PERM, 18) == -xp.ENOSPC


def test_siglock_is_held_where_the_kernel_holds_it(spr: Machine) -> None:
    """__xstate_request_perm() and validate_sigaltstack() assert the siglock."""
    start(spr)
    spr.enter_kernel(0)
    with pytest.raises(xp.IllegalEvent, match="siglock held"):
        xp.__xstate_request_perm(spr.cpus[0], 0x202E7, XTILE_DATA, False)

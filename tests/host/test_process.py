"""fork, vfork, clone and execve on the running kernel: inherited registers and permissions."""

from __future__ import annotations

import pytest

from fpstate.errors import FpstateError, HostUnavailable
from fpstate.host.child import (
    FCW_DEFAULT,
    MXCSR_DEFAULT,
    MXCSR_PATTERN,
    X87_PI,
    register_class,
    zmm_pattern,
)
from fpstate.host.process import KINDS, ExecRun, InheritRun, exec_state, inherit

pytestmark = pytest.mark.host

XTILE_DATA = 1 << 18


@pytest.fixture(scope="module")
def rc():
    try:
        return register_class()
    except HostUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module", params=KINDS)
def run(request, rc) -> InheritRun:
    return inherit(request.param, seed=0x6E)


def _vec(image, rc, n):
    return {64: image.zmm, 32: image.ymm, 16: image.xmm}[rc.vector_bytes](n)


def test_new_task_runs_and_everyone_exits_cleanly(run: InheritRun) -> None:
    assert run.exit.exit_code == 0
    assert run.child is not None and run.parent_after is not None


def test_new_task_starts_with_the_parents_vector_registers(run: InheritRun, rc) -> None:
    """fpu_clone(): the child's fpstate is saved from the parent's live registers, so ZMM
    (XMM/YMM) values cross fork, vfork and clone unchanged."""
    for n in range(rc.vector_regs):
        assert _vec(run.child, rc, n) == zmm_pattern(n, run.seed)[:rc.vector_bytes]
        assert _vec(run.child, rc, n) == _vec(run.parent_before, rc, n)


def test_new_task_inherits_opmask_mxcsr_and_x87(run: InheritRun, rc) -> None:
    c = run.child
    if rc.opmask:
        assert [c.opmask(k) for k in range(8)] == [run.parent_before.opmask(k)
                                                   for k in range(8)]
    assert c.mxcsr == MXCSR_PATTERN
    assert c.st(0) == X87_PI and c.fcw == run.parent_before.fcw
    assert c.xstate_bv == run.parent_before.xstate_bv


def test_creating_task_keeps_its_registers(run: InheritRun, rc) -> None:
    for n in range(rc.vector_regs):
        assert _vec(run.parent_after, rc, n) == _vec(run.parent_before, rc, n)
    assert run.parent_after.mxcsr == MXCSR_PATTERN


def test_new_task_has_the_default_permission(run: InheritRun, rc) -> None:
    """Threads read the group leader's perm; a new process gets fpu_inherit_perms() (only
    when dynamic features exist) or its default: both are the parent's here."""
    assert run.child_perm_ret == 0
    assert run.child_perm == rc.xcr0 & ~XTILE_DATA


@pytest.fixture(scope="module")
def exec_run(rc) -> ExecRun:
    return exec_state(seed=0x7F)


def test_exec_starts_in_the_init_state(exec_run: ExecRun, rc) -> None:
    """fpu_flush_thread(): the exec'd image's first instruction sees init_fpstate."""
    im = exec_run.image
    assert _vec(exec_run.parent_before, rc, 3) == zmm_pattern(3, exec_run.seed)[:rc.vector_bytes]
    for n in range(rc.vector_regs):
        assert _vec(im, rc, n) == bytes(rc.vector_bytes)
    if rc.opmask:
        assert all(im.opmask(k) == 0 for k in range(8))
    assert im.mxcsr == MXCSR_DEFAULT and im.fcw == FCW_DEFAULT
    assert im.st(0) == bytes(10)


def test_exec_resets_permissions_to_the_defaults(exec_run: ExecRun, rc) -> None:
    assert exec_run.supp == rc.xcr0
    assert exec_run.perm == rc.xcr0 & ~XTILE_DATA
    assert exec_run.guest_perm == rc.xcr0 & ~XTILE_DATA


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(FpstateError, match="posix_spawn"):
        inherit("posix_spawn")


def test_fork_copies_protection_keys_and_their_allocation() -> None:
    """dup_mmap() copies the keyed mapping with its key and arch_dup_pkeys() the allocation
    map: the child sees the key, allocates the next one, and freeing the parent's key in the
    child leaves it allocated in the parent (the model: conform case inherit/pkeys)."""
    from fpstate.host.pkeys import pkey_inheritance
    from fpstate.kernel.x86.conform import host_pku_reason

    reason = host_pku_reason()
    if reason:
        pytest.skip(reason)
    got = pkey_inheritance()
    key = got["parent pkey_alloc"]
    assert key > 0
    assert got["parent mapping ProtectionKey"] == got["child mapping ProtectionKey"] == key
    assert got["child pkey_alloc"] == got["parent pkey_alloc after the child's"] == key + 1
    assert got["child pkey_free(parent key)"] == 0
    assert got["parent pkey_mprotect(parent key) after the child freed it"] == 0

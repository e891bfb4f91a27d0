"""arch_prctl xstate permissions and the auxiliary vector, asked of the running kernel."""

from __future__ import annotations

import errno

import pytest

from fpstate.errors import HostUnavailable
from fpstate.host import native
from fpstate.host.auxv import (
    AT_HWCAP,
    AT_MINSIGSTKSZ,
    MINSIGSTKSZ,
    at_minsigstksz,
    getauxval,
    max_sigframe_size_from_dmesg,
    parse_auxv,
    read_auxv,
)
from fpstate.host.child import errno_name, register_class
from fpstate.host.prctl import (
    ARCH_GET_XCOMP_GUEST_PERM,
    ARCH_GET_XCOMP_PERM,
    ARCH_GET_XCOMP_SUPP,
    ARCH_REQ_XCOMP_PERM,
    ARCH_XCOMP_TILECFG,
    ARCH_XCOMP_TILEDATA,
    PrctlCall,
    get_xcomp_guest_perm,
    get_xcomp_perm,
    get_xcomp_supp,
    permission_snapshot,
    prctl_sequence,
    req_errno_table,
    req_xcomp_perm,
)

pytestmark = pytest.mark.host

XTILE_DATA = 1 << 18


@pytest.fixture(scope="module")
def xcr0() -> int:
    try:
        return register_class().xcr0
    except HostUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def has_amx() -> bool:
    return bool((native.cpuid(7, 0)[3] >> 24) & 1)


def test_option_numbers_are_the_uapi_ones() -> None:
    """arch/x86/include/uapi/asm/prctl.h."""
    assert (ARCH_GET_XCOMP_SUPP, ARCH_GET_XCOMP_PERM, ARCH_REQ_XCOMP_PERM,
            ARCH_GET_XCOMP_GUEST_PERM) == (0x1021, 0x1022, 0x1023, 0x1024)
    assert (ARCH_XCOMP_TILECFG, ARCH_XCOMP_TILEDATA) == (17, 18)


def test_get_xcomp_supp_is_xcr0(xcr0: int) -> None:
    """fpu_user_cfg.max_features | legacy_features, and XCR0 = fpu_user_cfg.max_features."""
    assert get_xcomp_supp() == xcr0


def test_default_permissions_exclude_only_the_dynamic_feature(xcr0: int) -> None:
    """perm and guest_perm start as the default features: max & ~XFEATURE_MASK_USER_DYNAMIC."""
    assert get_xcomp_perm() == xcr0 & ~XTILE_DATA
    assert get_xcomp_guest_perm() == xcr0 & ~XTILE_DATA
    snap = permission_snapshot()
    assert (snap.supp, snap.perm, snap.guest_perm) == (xcr0, xcr0 & ~XTILE_DATA,
                                                       xcr0 & ~XTILE_DATA)


@pytest.mark.parametrize("guest", [False, True])
def test_req_feature_numbers_outside_the_enum_are_einval(guest: bool, xcr0: int) -> None:
    """idx >= XFEATURE_MAX (20) -> -EINVAL, checked before anything else."""
    table = req_errno_table([20, 21, 63, 64, 2**63, 2**64 - 1], guest=guest)
    assert set(table.values()) == {errno.EINVAL}


@pytest.mark.parametrize("guest", [False, True])
def test_req_of_a_non_dynamic_feature_is_eopnotsupp(guest: bool, xcr0: int) -> None:
    """xstate_prctl_req[] maps only XTILE_DATA: any other number -> -EOPNOTSUPP, even a
    feature that is already permitted (SSE) or XTILE_CFG."""
    nums = [i for i in range(20) if i != ARCH_XCOMP_TILEDATA]
    table = req_errno_table(nums, guest=guest)
    assert {errno_name(e) for e in table.values()} == {"EOPNOTSUPP"}


@pytest.mark.parametrize("guest", [False, True])
def test_req_tiledata_without_amx_is_eopnotsupp(guest: bool, has_amx: bool) -> None:
    """XTILE_DATA not in fpu_user_cfg.max_features -> -EOPNOTSUPP."""
    if has_amx:
        pytest.skip("host has AMX: XTILE_DATA is grantable here (see the AMX test)")
    r = req_xcomp_perm(ARCH_XCOMP_TILEDATA, guest=guest)
    assert r.errno_name == "EOPNOTSUPP"


def test_req_tiledata_with_amx_is_granted_and_sticky(has_amx: bool, xcr0: int) -> None:
    if not has_amx:
        pytest.skip("host lacks AMX: CPUID.(EAX=7,ECX=0):EDX[24]=0")
    r = prctl_sequence([PrctlCall(ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA),
                        PrctlCall(ARCH_GET_XCOMP_PERM),
                        PrctlCall(ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA)])
    assert r[0].errno == 0 and r[1].value == xcr0 and r[2].errno == 0


def test_failed_requests_change_nothing(xcr0: int) -> None:
    r = prctl_sequence([PrctlCall(ARCH_REQ_XCOMP_PERM, ARCH_XCOMP_TILEDATA),
                        PrctlCall(ARCH_REQ_XCOMP_PERM, 99),
                        PrctlCall(ARCH_GET_XCOMP_PERM),
                        PrctlCall(ARCH_GET_XCOMP_GUEST_PERM)])
    assert r[2].value == xcr0 & ~XTILE_DATA and r[3].value == xcr0 & ~XTILE_DATA


def test_bad_pointers_and_unknown_options(xcr0: int) -> None:
    """put_user to NULL or a kernel address -> -EFAULT; an option not in
    do_arch_prctl_common -> -EINVAL."""
    r = prctl_sequence([PrctlCall(ARCH_GET_XCOMP_SUPP, 0), PrctlCall(ARCH_GET_XCOMP_PERM, 0),
                        PrctlCall(ARCH_GET_XCOMP_GUEST_PERM, 0xFFFF800000000000),
                        PrctlCall(0x1026, 0), PrctlCall(0x1020, 0)])
    assert [x.errno for x in r] == [errno.EFAULT] * 3 + [errno.EINVAL] * 2


# -- the auxiliary vector ------------------------------------------------------------------

def test_at_minsigstksz_is_the_boot_time_max_sigframe_size() -> None:
    """AT_MINSIGSTKSZ = get_sigframe_size() = the 'signal: max sigframe size' boot line."""
    value = at_minsigstksz()
    assert value == read_auxv().minsigstksz
    try:
        assert value == max_sigframe_size_from_dmesg()
    except HostUnavailable as e:
        pytest.skip(str(e))


def test_sigframe_line_falls_back_to_the_messages_kept_in_this_boot(
        monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """Once the ring buffer has overwritten the boot, the line comes from what
    fpstate.host.dmesg kept under this boot's boot_id; nothing kept -> HostUnavailable."""
    import subprocess

    from fpstate.host import auxv, dmesg

    kept = tmp_path / "boot-lines.txt"
    monkeypatch.setattr(dmesg, "_cache_path", lambda: str(kept))
    monkeypatch.setattr(auxv.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(
        a, 0, "[ 3081.401660] fpstate[8888] bad frame in rt_sigreturn\n", ""))
    with pytest.raises(HostUnavailable, match="none was kept in this boot"):
        max_sigframe_size_from_dmesg()
    kept.write_text("x86/fpu: Enabled xstate features 0x18e7\nsignal: max sigframe size: 3376\n")
    assert max_sigframe_size_from_dmesg() == 3376


def test_at_minsigstksz_exceeds_the_uapi_constant_with_avx512(xcr0: int) -> None:
    """The XSAVE area alone (2432+ bytes with AVX-512) outgrows MINSIGSTKSZ = 2048."""
    if xcr0 & 0xE0 != 0xE0:
        pytest.skip("host lacks AVX-512")
    assert at_minsigstksz() > MINSIGSTKSZ


def test_at_minsigstksz_covers_the_real_frame(xcr0: int) -> None:
    """max_frame_size (worst case: ia32 frame + fsave header + padding) >= what a 64-bit
    frame needs: red zone excluded, user_size + 4 + rt_sigframe + alignment."""
    from fpstate.host.child import host_user_xstate_size
    need = host_user_xstate_size() + 4 + 63 + 440 + 15 + 8
    assert at_minsigstksz() >= need


def test_at_hwcap_is_cpuid_1_edx() -> None:
    """ELF_HWCAP = boot_cpu_data.x86_capability[CPUID_1_EDX], as /proc/self/auxv shows it
    (glibc's getauxval(AT_HWCAP) answers its own dl_hwcap on x86-64 instead)."""
    assert read_auxv().hwcap == native.cpuid(1)[3]
    assert read_auxv().get(AT_HWCAP) == native.cpuid(1)[3]


def test_auxv_parser_stops_at_at_null() -> None:
    raw = (AT_MINSIGSTKSZ.to_bytes(8, "little") + (3376).to_bytes(8, "little")
           + bytes(16) + (99).to_bytes(8, "little") + (1).to_bytes(8, "little"))
    assert parse_auxv(raw).entries == ((AT_MINSIGSTKSZ, 3376),)
    assert getauxval(0x7FFF) is None


def test_ia32_frame_and_the_at_minsigstksz_formula(xcr0: int) -> None:
    """init_sigframe_size(): max_frame_size = round_up(sizeof(struct sigframe_ia32) + 15 +
    fpu__get_fpstate_size() + 63, 16), with fpu__get_fpstate_size() = user max_size + 4
    (magic2) + 112 (fregs_state, IA32_EMULATION) and sizeof(struct sigframe_ia32) = 736 in a
    64-bit kernel (732 bytes of members, 8-aligned by _fpx_sw_bytes.xfeatures). The 32-bit
    frame itself confirms the size range: its handler ESP sits 740 bytes below the fsave
    header, i.e. ((-S + 4) & -16) - 4 = -740 for S in 725..740."""
    from fpstate.host.auxv import ia32_sigframe
    from fpstate.host.child import host_user_xstate_size

    try:
        f = ia32_sigframe()
    except HostUnavailable as e:
        pytest.skip(str(e))
    user = host_user_xstate_size()
    assert f.extended_size == user + 4 + 112
    assert f.xstate_size == user and f.xfeatures == xcr0
    assert (f.fpstate + 112) % 64 == 0
    assert f.frame_bytes == 740
    assert at_minsigstksz() == (736 + 15 + (user + 4 + 112) + 63 + 15) // 16 * 16


def test_get_xcomp_supp_into_a_page_whose_key_the_caller_closed_is_efault() -> None:
    """put_user() runs under the calling thread's PKRU: ARCH_GET_XCOMP_SUPP into a page whose
    protection key the thread closed fails with EFAULT; with the key open it succeeds (the
    model: conform case arch_prctl/pkey-closed-buffer)."""
    from fpstate.host.prctl import get_supp_into_keyed_page
    from fpstate.kernel.x86.conform import host_pku_reason

    reason = host_pku_reason()
    if reason:
        pytest.skip(reason)
    key, opened, closed = get_supp_into_keyed_page()
    assert key > 0 and opened == 0 and closed == errno.EFAULT

"""fpstate compat (x86): every pair of bundled profiles, the findings that decide safety, and
the command's exit statuses."""

from __future__ import annotations

import itertools
import json

import pytest

from fpstate.cli import main
from fpstate.kernel.x86.sched import Machine
from fpstate.tools.compat import compat_x86, glibc_xsave_state_size
from fpstate.x86.profiles import bundled_profile, list_profiles

NAMES = sorted(list_profiles())
PROFILES = {n: bundled_profile(n) for n in NAMES}
USER = {n: Machine.boot(p, ncpus=1).system.user.max_features for n, p in PROFILES.items()}


@pytest.fixture(scope="module")
def reports():
    return {(a, b): compat_x86(PROFILES[a], PROFILES[b])
            for a, b in itertools.product(NAMES, repeat=2)}


def _offsets_differ(a: str, b: str) -> bool:
    pa, pb = PROFILES[a], PROFILES[b]
    shared = USER[a] & USER[b] & ~0x3
    return any(pa.component(i).offset != pb.component(i).offset
               for i in range(64) if shared >> i & 1)


def test_every_pair(reports) -> None:
    """Per pair: the same CPU is safe with nothing lost; a lost user feature makes the process
    unsafe with a refusal naming it; shared components at other offsets make the guest unsafe
    and the opaque-buffer VMMs get wrong registers."""
    for (a, b), r in reports.items():
        lost = USER[a] & ~USER[b]
        assert r.user_lost == tuple(i for i in range(64) if lost >> i & 1), (a, b)
        if a == b:
            assert r.safe and all(x == y for _, x, y in r.sizes), a
            continue
        if lost:
            assert not r.process_restores, (a, b)
            refusal = next(f.text for f in r.process if f.text.startswith("state translation"))
            for i in r.user_lost:
                assert f"(component {i})" in refusal, (a, b, i)
            assert not r.guest_restores, (a, b)
        if _offsets_differ(a, b):
            assert not r.guest_restores, (a, b)
            fc = next(f for f in r.vmm if f.who == "Firecracker")
            assert fc.blocking and ("arrive wrong" in fc.text or "-EINVAL" in fc.text), (a, b)
        if not lost and not _offsets_differ(a, b):
            assert r.guest_restores, (a, b)
        assert r.safe == (r.process_restores and r.guest_restores)


def test_amd_to_intel_avx512_layout(reports) -> None:
    r = reports[("zen4", "sapphire-rapids")]
    assert "opmask: standard offset 0x340 -> 0x440" in r.layout
    assert r.process_restores and not r.guest_restores
    fc = next(f for f in r.vmm if f.who == "Firecracker")
    assert "KVM_SET_XSAVE of SRC's 4096-byte buffer as it is: 0" in fc.text
    assert "opmask: 8 of 8 registers" in fc.text
    assert r.amx_guest_permission.startswith("not needed")


def test_amx_guest_to_a_cpu_without_amx(reports) -> None:
    r = reports[("sapphire-rapids", "zen4")]
    assert r.guest[0].text == ("KVM_SET_CPUID2 with the guest's (SRC's) leaf 0xD "
                                            "on DST: -EPERM")
    assert "its tile state cannot be restored" in r.amx_guest_permission
    assert dict((k, (x, y)) for k, x, y in r.sizes)["kvm_xsave2_size.guest_perm"] == (11008, 4096)
    r = reports[("sapphire-rapids", "granite-rapids")]
    assert r.amx_guest_permission.startswith("needed: DST's VMM must call "
                                             "ARCH_REQ_XCOMP_GUEST_PERM")


def test_glibc_buffer_sized_on_a_smaller_cpu(reports) -> None:
    """criu#3120: glibc's XSAVEC area is sized at startup; zen2 (AVX) -> Skylake-SP (MPX,
    AVX-512) writes 2496 bytes into 832."""
    assert glibc_xsave_state_size(PROFILES["zen2"], USER["zen2"]) == (832, 832)
    r = reports[("zen2", "skylake-sp")]
    glibc = [f for f in r.process if f.text.startswith("glibc")]
    assert glibc and glibc[0].blocking and "writes 2496" in glibc[0].text
    assert r.guest_restores and not r.safe


def test_cli_exit_statuses_and_json(capsys) -> None:
    assert main(["compat", "zen4", "zen5"]) == 0
    assert "zen4 -> zen5 (kernel 6.18): SAFE" in capsys.readouterr().out
    assert main(["compat", "zen4", "haswell", "--json"]) == 1
    obj = json.loads(capsys.readouterr().out)
    assert obj["safe"] is False and obj["features"]["user_lost"] == ["opmask", "zmm_hi256",
                                                                     "hi16_zmm", "pkru"]
    assert {"registers_lost", "layout_changes", "sizes", "amx_guest_permission", "process",
            "guest", "vmm"} <= set(obj)
    assert main(["compat", "zen4", "no-such-cpu"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["compat", "zen4", "zen5", "--kernel", "9.9"]) == 2


@pytest.mark.host
def test_host_to_itself_is_safe(capsys) -> None:
    from fpstate.errors import HostUnavailable
    from fpstate.x86.profiles import load_profile

    try:
        load_profile("host")
    except HostUnavailable as e:
        pytest.skip(str(e))
    assert main(["compat", "host", "host"]) == 0


def test_a_guest_that_cannot_move_gets_the_template_hint(reports) -> None:
    """A guest that does not restore is pointed at the leaf 0xD both CPUs honour (fpstate
    template); one that restores gets no hint."""
    r = reports[("zen4", "sapphire-rapids")]
    assert not r.guest_restores
    assert r.template == ("`fpstate template zen4 sapphire-rapids` gives a CPUID leaf 0xD both "
                          "honour: XCR0 0x7, IA32_XSS 0x1800 (leaves out opmask, zmm_hi256, "
                          "hi16_zmm, pkru, xtilecfg, xtiledata)")
    assert r.to_dict()["template"] == r.template
    for r in reports.values():
        assert bool(r.template) == (not r.guest_restores), (r.src, r.dst)


def test_a_guest_offered_the_templates_features_moves(capsys) -> None:
    """The template's answer closes the loop: a Sapphire Rapids guest whose CPU model offers
    x87/SSE/AVX only (--guest-xcr0 0x7) restores on Haswell -- KVM_GET_XSAVE2 then holds those
    features in a 4096-byte buffer that Haswell's KVM_SET_XSAVE takes as it is -- while the
    same guest offered everything does not; the process part does not change."""
    spr, hsw = PROFILES["sapphire-rapids"], PROFILES["haswell"]
    full, narrow = compat_x86(spr, hsw), compat_x86(spr, hsw, guest_xcr0=0x7)
    assert not full.guest_restores and narrow.guest_restores
    assert narrow.process == full.process and not narrow.process_restores
    assert narrow.guest_xcr0 == 0x7 and narrow.to_dict()["guest_xcr0"] == "0x7"
    assert full.to_dict()["guest_xcr0"] is None
    fire = next(f for f in narrow.vmm if f.who == "Firecracker")
    assert "KVM_SET_XSAVE of SRC's 4096-byte buffer as it is: 0" in fire.text
    assert not fire.blocking and narrow.template == ""
    assert main(["compat", "sapphire-rapids", "haswell", "--guest-xcr0", "x87|sse|avx"]) == 1
    out = capsys.readouterr().out
    assert ("guest saved on sapphire-rapids (its CPU model offers XCR0 0x7: x87, sse, avx) "
            "restores on haswell: yes") in out


def test_a_guest_offered_avx512_meets_the_layout_of_its_features() -> None:
    """Offered AVX-512 and PKRU, a Sapphire Rapids guest does not move to Zen 4: it keeps
    Intel's offsets (opmask at 0x440, after the MPX gap) where AMD's XSAVE uses 0x340; offered
    x87/SSE/AVX it moves (their offsets are architectural)."""
    spr, zen4 = PROFILES["sapphire-rapids"], PROFILES["zen4"]
    r = compat_x86(spr, zen4, guest_xcr0=0x2E7)
    assert not r.guest_restores
    layout = [f for f in r.guest if "DST's layout" in f.text]
    assert layout and "opmask: standard offset 0x440 -> 0x340" in layout[0].text
    assert compat_x86(spr, zen4, guest_xcr0=0x7).guest_restores


def test_guest_xcr0_bad_input(capsys) -> None:
    assert main(["compat", "zen4", "zen5", "--guest-xcr0", "x87|ymm"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'ymm' is neither a number nor a component name" in err
    assert main(["compat", "--arch", "arm64", "neoverse-n1", "neoverse-v1",
                 "--guest-xcr0", "7"]) == 2
    assert "--guest-xcr0 is an x86 option" in capsys.readouterr().err


def test_x87_pointers_saved_differently_are_reported_never_blocking(reports) -> None:
    """rr issue 2698: the FOP/FIP/FDP an FXSAVE stores after an FLD differ between CPUs --
    AMD stores none without FSW.ES (X87_POINTERS), Haswell has no FDP_EXCPTN_ONLY -- and are
    reported field by field, as are the FCS/FDS of a 32-bit FXSAVE; equal behaviour reports
    nothing; it never decides safety."""
    amd_intel = reports[("zen4", "sapphire-rapids")].x87
    assert [f.who for f in amd_intel] == ["rr", "rr", "guest"]
    assert "FOP 0x0 -> 0x123; FIP 0x0 -> 0x401000; FDP 0x0 -> 0x2222" in amd_intel[0].text
    # a 32-bit FXSAVE with an exception pending: AMD keeps FCS/FDS, Intel stores 0000H
    # (measured on Zen 4 and Emerald Rapids)
    assert "stores FCS 0x23 -> 0x0, FDS 0x2b -> 0x0 (SRC: FCS and FDS kept" in amd_intel[1].text
    assert [f.who for f in reports[("zen4", "zen2")].x87] == []
    hsw = reports[("haswell", "skylake-sp")].x87
    assert "stores FDP 0x402000 -> 0x2222 (" in hsw[0].text
    assert reports[("sapphire-rapids", "granite-rapids")].x87 == ()
    assert reports[("zen3", "zen5")].x87 == ()
    assert all(not f.blocking for r in reports.values() for f in r.x87)
    assert reports[("zen4", "zen5")].safe


def test_cli_shows_the_x87_pointers(capsys) -> None:
    assert main(["compat", "zen5", "alder-lake"]) == 1  # AVX-512 lost: not safe
    out = capsys.readouterr().out
    assert "x87 pointers: saved differently" in out and "[rr]" in out
    assert main(["compat", "zen5", "zen4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["x87_pointers"] == []

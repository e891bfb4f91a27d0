"""fpstate template: the leaf 0xD a pool of hosts can honour, the check of a template against a
host (KVM model and Linux guest boot), the three template formats, the command's exit
statuses, and the reader fuzzed."""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fpstate.cli import main
from fpstate.kvm.x86.cpuid import CpuidEntry2, cpuid_regs, supported_cpuid_leaf_0xd
from fpstate.tools.template import (
    TemplateError,
    check_template,
    format_template,
    host_offer,
    pool_template,
    read_template,
)
from fpstate.x86.profiles import bundled_profile, list_profiles
from fpstate.x86.xfeatures import XFEATURE_MASK_XTILE

P = {n: bundled_profile(n) for n in list_profiles()}


def _sub(entries, i):
    return cpuid_regs(entries, 0xD, i)


def _set(entries, i, **regs):
    return tuple(replace(e, **regs) if (e.function, e.index) == (0xD, i) else e for e in entries)


# -- the pool's template ---------------------------------------------------------------------------


def test_intel_and_amd_share_only_avx() -> None:
    """Sapphire Rapids and Zen 4: AVX-512 and PKRU sit 0x100 further on Intel (after the MPX
    gap), AMX is Intel's only, so the guest gets x87|SSE|AVX and CET; sub-leaf 0 ECX is the
    standard size of that (832), sub-leaf 1 EBX the compacted size with CET (872); AMD's KVM
    has no XFD."""
    t = pool_template([P["sapphire-rapids"], P["zen4"]])
    assert (t.xcr0, t.xss, t.d1_eax) == (0x7, 0x1800, 0xF)
    e = t.entries()
    assert _sub(e, 0) == (0x7, 832, 832, 0)
    assert _sub(e, 1) == (0xF, 872, 0x1800, 0)
    assert _sub(e, 2) == (256, 576, 0, 0)
    assert _sub(e, 11) == (16, 0, 1, 0) and _sub(e, 12) == (24, 0, 1, 0)
    assert all(_sub(e, i) == (0, 0, 0, 0) for i in (5, 6, 7, 9, 17, 18))
    left = {x.number: x.reason for x in t.left}
    assert sorted(left) == [5, 6, 7, 9, 17, 18]
    assert left[5].startswith("standard offset differs: 0x440 on sapphire-rapids, 0x340 on zen4")
    assert left[9].startswith("standard offset differs: 0xa80 on sapphire-rapids, 0x980 on zen4")
    assert left[18].startswith("KVM on zen4 does not offer it")
    assert dict(t.clear_flags) == {"AVX512F": (5, 6, 7), "PKU": (9,), "AMX_TILE": (17, 18)}
    text = format_template(t)
    assert "XCR0 0x7 (x87, sse, avx)" in text and "  PKU: CPUID.(EAX=0x7,ECX=0x0):ECX[3]" in text


def test_two_intel_generations_keep_avx512() -> None:
    """Ice Lake and Skylake: the same offsets, so AVX-512 and PKRU stay; Skylake's MPX is
    not on Ice Lake, so both MPX components go (and its flag)."""
    t = pool_template([P["icelake-sp"], P["skylake-sp"]])
    assert t.xcr0 == 0x2E7
    assert {x.number for x in t.left} == {3, 4}
    assert dict(t.clear_flags) == {"MPX": (3, 4)}
    assert _sub(t.entries(), 0)[2] == 2696


@pytest.mark.parametrize("name", sorted(P))
def test_a_pool_of_one_is_what_kvm_supports(name: str) -> None:
    """A CPU alone: the template offers what KVM_GET_SUPPORTED_CPUID lists once the VMM holds
    the AMX guest permission (the model's __do_cpuid_func), sub-leaf for sub-leaf, and the
    check of it on that CPU finds no problem; only sub-leaf 0 EBX differs (KVM reports the
    size of everything, the template too: both are ECX)."""
    p = P[name]
    t = pool_template([p])
    offer = host_offer(p)
    kvm = supported_cpuid_leaf_0xd(offer.caps, p, guest_perm=offer.xcr0 | XFEATURE_MASK_XTILE)
    assert t.xcr0 == _sub(kvm, 0)[0] | _sub(kvm, 0)[3] << 32
    assert t.xss == _sub(kvm, 1)[2] | _sub(kvm, 1)[3] << 32
    for i in range(2, 63):
        assert _sub(t.entries(), i) == _sub(kvm, i), (name, i)
    assert _sub(t.entries(), 0)[1:3] == _sub(kvm, 0)[1:3]
    c = check_template(t.entries(), p)
    assert c.ok, c.findings
    assert c.linux_xcr0 == t.xcr0


def test_requested_masks() -> None:
    t = pool_template([P["sapphire-rapids"]], xcr0=0x7, xss=0)
    assert (t.xcr0, t.xss) == (0x7, 0)
    assert {x.number: x.reason for x in t.left}[11] == "not in the requested IA32_XSS 0x0"
    with pytest.raises(TemplateError, match=r"XCR0 0x2e7 asks for what the pool cannot give: "
                                            r"opmask \(component 5\): standard offset differs"):
        pool_template([P["sapphire-rapids"], P["zen4"]], xcr0=0x2E7)
    with pytest.raises(TemplateError, match=r"XSETBV #GP: XCR0\[7:5\] \(AVX-512\)"):
        pool_template([P["sapphire-rapids"]], xcr0=0x27)
    with pytest.raises(TemplateError, match="no host of the pool has it"):
        pool_template([P["haswell"]], xcr0=0x1 << 40 | 3)


def test_no_xsaves_no_supervisor_state() -> None:
    """Haswell has no XSAVES: a pool with it offers no IA32_XSS, and says why for CET."""
    t = pool_template([P["haswell"], P["zen4"]])
    assert t.xss == 0 and t.xcr0 == 0x7
    assert not t.d1_eax & 0x8


# -- checking a template ---------------------------------------------------------------------------


def test_check_finds_the_intel_layout_on_amd() -> None:
    """Sapphire Rapids' leaf 0xD (no AMX) on Zen 4: each AVX-512 component and PKRU at the
    wrong offset, XFD advertised to AMD's KVM, and KVM rewriting EBX from Intel's 2696 to the
    2440 bytes Zen 4's XSAVE writes."""
    t = pool_template([P["sapphire-rapids"]], xcr0=0x2E7)
    c = check_template(t.entries(), P["zen4"])
    assert not c.ok
    errors = [f.what for f in c.findings if f.severity == "error"]
    assert errors[0] == "CPUID.(0DH,1):EAX advertises XFD, which KVM on zen4 does not offer"
    assert ("opmask (component 5): standard offset 0x440 in the template, 0x340 on zen4: the "
            "guest's XSAVE follows zen4's") in errors
    assert len([e for e in errors if "standard offset" in e]) == 4
    assert ("KVM rewrites CPUID.(0DH,0).EBX from 2696 to 2440 (the standard size of the XCR0 "
            "the guest has, kvm_update_cpuid_runtime)") in [f.what for f in c.findings]


def test_check_pkru_on_a_cpu_without_pku() -> None:
    """Haswell's KVM cannot give PKRU: KVM_SET_CPUID2 takes the table, guest_supported_xcr0
    drops the bit, and the guest's XSETBV with it would #GP."""
    t = pool_template([P["haswell"]])
    e = _set(t.entries(), 0, eax=0x207)
    e = (*e, CpuidEntry2(0xD, 9, 1, 8, 0xA80, 0, 0))
    c = check_template(e, P["haswell"])
    assert c.guest_supported_xcr0 == 0x7 and c.xcr0 == 0x207
    assert any(f.what.startswith("KVM on haswell does not support pkru (0x200): "
                                 "guest_supported_xcr0 is 0x7") for f in c.findings)
    assert c.linux_xcr0 == 0x7  # haswell has no PKU: the guest kernel leaves PKRU off


def test_check_small_ecx_and_amx_permission() -> None:
    t = pool_template([P["sapphire-rapids"]])
    c = check_template(_set(t.entries(), 0, ecx=0x300), P["sapphire-rapids"])
    assert [f.what for f in c.findings if f.severity == "error"] == [
        "CPUID.(0DH,0).ECX 768 is smaller than the 11008 bytes the advertised XCR0 needs on "
        "sapphire-rapids: a guest buffer sized from it overflows"]
    assert c.findings[0].what.startswith("KVM_SET_CPUID2 without guest permission: -EPERM")
    # AMX advertised on a CPU without it: the permission request itself fails.
    c = check_template(t.entries(), P["icelake-sp"])
    assert any(f.what.startswith("ARCH_REQ_XCOMP_GUEST_PERM(XTILE_DATA) on icelake-sp: -EOPNOTSUPP")
               for f in c.findings)


def test_check_invalid_xcr0_and_missing_sub_leaf() -> None:
    t = pool_template([P["zen4"]])
    c = check_template(_set(t.entries(), 0, eax=0x27), P["zen4"])
    errors = [f.what for f in c.findings if f.severity == "error"]
    assert errors[0].startswith("advertised XCR0 0x27 is not one XSETBV takes (XCR0[7:5]")
    e = tuple(x for x in t.entries() if x.index != 6)
    c = check_template(e, P["zen4"])
    assert ("zmm_hi256 (component 6) is advertised, and its sub-leaf 0x6 is zero"
            in [f.what for f in c.findings])


def test_check_notes_flags_left_set() -> None:
    """A template without AVX-512 checked on a CPU whose leaf 7 still says AVX512F (the
    template carries no leaf 7): a note, not an error."""
    t = pool_template([P["sapphire-rapids"], P["zen4"]])
    c = check_template(t.entries(), P["sapphire-rapids"])
    assert c.ok and c.linux_xcr0 == 0x7
    notes = [f.what for f in c.findings]
    assert any(n.startswith("CPUID flag AVX512F (CPUID.(EAX=0x7,ECX=0x0):EBX[16]) is set while "
                            "opmask, zmm_hi256, hi16_zmm are not advertised") for n in notes)


# -- formats ---------------------------------------------------------------------------------------


def test_json_and_firecracker_round_trip(tmp_path) -> None:
    sr = P["sapphire-rapids"]
    t = pool_template([sr, P["zen4"]])
    j = tmp_path / "t.json"
    j.write_text(json.dumps(t.to_json()))
    assert read_template(str(j)) == t.entries()
    fc = tmp_path / "fc.json"
    fc.write_text(json.dumps(t.to_firecracker()))
    got = read_template(str(fc), sr)
    d = tuple(e for e in got if e.function == 0xD)
    assert d == t.entries()
    leaf7 = next(e for e in got if e.function == 7 and e.index == 0)
    a, b, c, dx = sr.cpuid(7, 0)
    assert (leaf7.ebx, leaf7.ecx, leaf7.edx) == (b & ~(1 << 16), c & ~(1 << 3), dx & ~(1 << 24))
    assert leaf7.eax == a
    # Checked with the template's leaf 7, no flag is left set.
    c = check_template(got, sr)
    assert c.ok and not [f for f in c.findings if "CPUID flag" in f.what]
    bitmaps = [m["bitmap"] for x in t.to_firecracker()["cpuid_modifiers"] for m in x["modifiers"]]
    assert all(len(b) == 34 and b.startswith("0b") for b in bitmaps)


def test_kvm_cpuid_entry_list(tmp_path) -> None:
    f = tmp_path / "e.json"
    f.write_text(json.dumps([{"function": 13, "index": 0, "flags": 1, "eax": 7, "ebx": 832,
                              "ecx": 832, "edx": 0},
                             {"function": "0xd", "index": "0x2", "flags": 1, "eax": "0x100",
                              "ebx": "0x240", "ecx": 0, "edx": 0}]))
    e = read_template(str(f))
    assert e[1] == CpuidEntry2(0xD, 2, 1, 256, 576, 0, 0)
    assert check_template(e, P["zen4"]).ok


# -- the command -----------------------------------------------------------------------------------


def test_cli(tmp_path, capsys) -> None:
    out = tmp_path / "fc.json"
    assert main(["template", "sapphire-rapids", "zen4", "--firecracker", "-o", str(out)]) == 0
    assert main(["template", "--check", str(out), "sapphire-rapids", "zen4"]) == 0
    capsys.readouterr()
    mine = tmp_path / "spr.json"
    assert main(["template", "sapphire-rapids", "--xcr0", "0x2e7", "--json", "-o",
                 str(mine)]) == 0
    assert main(["template", "--check", str(mine), "zen4", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report[0]["host"] == "zen4" and report[0]["ok"] is False
    assert report[0]["linux"] == "6.18"
    assert main(["template", "--check", str(mine), "sapphire-rapids", "--guest-kernel",
                 "5.16"]) == 0
    assert "a Linux 5.16 guest enables XCR0 0x2e7" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["template", "pentium"], "unknown profile 'pentium'"),
    (["template", "zen4", "--xcr0", "avx|bogus"], "argument --xcr0: mask 'avx|bogus'"),
    (["template", "zen4", "sapphire-rapids", "--xcr0", "0x2e7"], "cannot give: opmask"),
    (["template", "zen4", "--xcr0", "0x27"], "XSETBV #GP"),
    (["template", "--check", "{missing}", "zen4"], "{missing}"),
    (["template", "--check", "{bad}", "zen4"], "not JSON"),
    (["template", "--check", "{nod}", "zen4"], "no CPUID leaf 0xD sub-leaf 0"),
    (["template", "--check", "{nod}", "zen4", "--xcr0", "7"], "--check takes no --xcr0"),
    (["template", "zen4", "--vendor", "svm"], "--vendor and --guest-kernel go with --check"),
    (["template", "zen4", "--guest-kernel", "5.16"], "go with --check"),
    (["template", "--check", "{good}", "zen4", "--guest-kernel", "9.9"],
     "unknown kernel version '9.9'"),
])
def test_cli_bad_input(tmp_path, capsys, argv, message) -> None:
    files = {"missing": tmp_path / "missing.json", "bad": tmp_path / "bad.json",
             "nod": tmp_path / "nod.json", "good": tmp_path / "good.json"}
    files["bad"].write_text("{")
    files["good"].write_text(json.dumps(pool_template([P["zen4"]]).to_json()))
    files["nod"].write_text(json.dumps({"entries": [{"function": 7, "eax": 0, "ebx": 0,
                                                     "ecx": 0, "edx": 0}]}))
    argv = [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]
    message = message.format(**{k: str(v) for k, v in files.items()})
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


# -- fuzzing ---------------------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers(-2, 1 << 70) | st.text(max_size=12),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(["function", "index", "flags", "eax",
                                                        "ebx", "ecx", "edx", "entries",
                                                        "cpuid_modifiers", "leaf", "subleaf",
                                                        "modifiers", "register", "bitmap"]),
                                       inner, max_size=7), max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                    HealthCheck.function_scoped_fixture])
@given(data=_json)
def test_reader_fuzz(tmp_path, data) -> None:
    """Any JSON: entries with leaf 0xD sub-leaf 0, or TemplateError."""
    f = tmp_path / "f.json"
    f.write_text(json.dumps(data))
    try:
        e = read_template(str(f), P["zen4"])
    except TemplateError:
        return
    assert any(x.function == 0xD and x.index == 0 for x in e)


_u32 = st.integers(0, 0xFFFFFFFF)


@settings(max_examples=150, deadline=None)
@given(sub=st.lists(st.tuples(st.integers(0, 63), _u32, _u32, _u32, _u32), min_size=1,
                    max_size=8),
       cpu=st.sampled_from(["zen4", "sapphire-rapids", "haswell"]))
# AVX advertised with its sub-leaf flagged supervisor: the guest kernel model once asserted
@example(sub=[(0, 7, 0, 0, 0), (2, 0, 0, 1, 0)], cpu="zen4")
def test_check_fuzz(sub, cpu) -> None:
    """Any leaf 0xD: the check answers (errors are findings), it never raises."""
    e = {0: CpuidEntry2(0xD, 0, 1, 3, 576, 576, 0)}
    for i, a, b, c, d in sub:
        e[i] = CpuidEntry2(0xD, i, 1, a, b, c, d)
    c = check_template(tuple(e.values()), P[cpu])
    assert c.host == cpu


def test_a_user_component_flagged_supervisor_disables_xsave_in_the_guest() -> None:
    """AVX in CPUID.(0DH,0).EAX but its sub-leaf's ECX[0] set: setup_xstate_cache() leaves its
    standard offset at -1 (unsigned), the user size wraps and the consistency check fails, so a
    Linux guest boots without XSAVE; the check says so instead of raising."""
    e = (CpuidEntry2(0xD, 0, 1, 7, 832, 832, 0), CpuidEntry2(0xD, 2, 1, 256, 0, 1, 0))
    c = check_template(e, P["zen4"])
    assert not c.ok and "a Linux guest boots without XSAVE: paranoid_size" in [
        f.what for f in c.findings]


@pytest.mark.parametrize("pair", list(itertools.combinations(sorted(P), 2)),
                         ids="+".join)
def test_every_pair_template_holds_on_both(pair) -> None:
    """The template of any two bundled CPUs passes the check on each of them: KVM takes it,
    keeps all of its XCR0 and IA32_XSS, and a Linux guest enables all of its XCR0."""
    t = pool_template([P[n] for n in pair])
    for n in pair:
        c = check_template(t.entries(), P[n])
        assert c.ok, (n, [f.what for f in c.findings if f.severity == "error"])
        assert (c.guest_supported_xcr0, c.guest_supported_xss) == (t.xcr0, t.xss)
        assert c.linux_xcr0 == t.xcr0, n


def test_amx_needs_the_same_palette() -> None:
    """Two AMX hosts whose palette 1 differs (fewer bytes per tile row on the second): the
    tiles are left out, with the leaf that differs."""
    from fpstate.x86.cpuid import CpuidProfile

    spr = P["sapphire-rapids"]
    leaves = dict(spr.leaves)
    a, b, c, d = leaves[(0x1D, 1)]
    leaves[(0x1D, 1)] = (a, b & ~0xFFFF | 32, c, d)
    other = CpuidProfile("spr-narrow", spr.vendor, leaves, "test")
    assert pool_template([spr, P["granite-rapids"]]).xcr0 & XFEATURE_MASK_XTILE
    t = pool_template([spr, other])
    assert not t.xcr0 & XFEATURE_MASK_XTILE
    why = {x.number: x.reason for x in t.left}
    assert why[17].startswith("AMX palette CPUID.(EAX=0x1d,ECX=1) differs: ")
    assert "on spr-narrow" in why[18]


def test_host_without_kvm_is_modelled(monkeypatch, capsys) -> None:
    """'host' without a usable /dev/kvm: one note on stderr, then KVM is the model's."""
    import fpstate.host.kvm as hk
    from fpstate.errors import HostUnavailable

    def unusable():
        raise HostUnavailable("/dev/kvm: No such file or directory")

    monkeypatch.setattr(hk, "open_kvm", unusable)
    try:
        from fpstate.host.cpuid import host_profile

        host_profile()
    except HostUnavailable as e:
        pytest.skip(f"no host CPU profile: {e}")
    assert main(["template", "host", "--json"]) == 0
    cap = capsys.readouterr()
    assert cap.err == ("fpstate: note: /dev/kvm: No such file or directory: KVM on this CPU is "
                       "modelled, not asked\n")
    assert json.loads(cap.out)["cpus"] == ["host"]


def test_a_guest_cpuid_dump() -> None:
    """`cpuid -r` run inside a KVM guest on an EPYC Zen 5 (tests/x86/data): its whole CPUID is
    the template. It holds on zen5; on Sapphire Rapids its AVX-512 offsets are AMD's and its
    sub-leaf 0 ECX (2432) is short of the 2688 bytes Intel's layout needs for XCR0 0xe7."""
    from pathlib import Path

    dump = str(Path(__file__).resolve().parents[1] / "x86" / "data" / "epyc-zen5-kvm.cpuid-r.txt")
    e = read_template(dump)
    assert any(x.function == 1 for x in e) and _sub(e, 0)[0] == 0xE7
    assert check_template(e, P["zen5"]).ok
    c = check_template(e, P["sapphire-rapids"])
    errors = [f.what for f in c.findings if f.severity == "error"]
    assert len([x for x in errors if "standard offset" in x]) == 3
    assert errors[-1] == ("CPUID.(0DH,0).ECX 2432 is smaller than the 2688 bytes the advertised "
                          "XCR0 needs on sapphire-rapids: a guest buffer sized from it overflows")


def test_neither_template_nor_dump(tmp_path) -> None:
    f = tmp_path / "x.txt"
    f.write_text("hello\n")
    with pytest.raises(TemplateError, match=r"x.txt: not a template \(not JSON: Expecting value "
                                            r"at line 1\) nor a CPUID dump \("):
        read_template(str(f))
    f.write_text(json.dumps([{"leaf": 13}]))
    with pytest.raises(TemplateError, match=r"not a template \(not a list of CPUID entries"):
        read_template(str(f))


def test_intel_keeps_pkru_at_0xa80_without_avx512() -> None:
    """Alder Lake (no AVX-512) and Zen 3 share only AVX: PKRU is at 0xa80 on Intel whatever the
    AVX-512 support, at 0x980 on AMD. Zen 2 enumerates PKRU without PKU: KVM cannot offer it."""
    t = pool_template([P["alder-lake"], P["zen3"]])
    assert t.xcr0 == 0x7
    why = {x.number: x.reason for x in t.left}
    assert why[9].startswith("standard offset differs: 0xa80 on alder-lake, 0x980 on zen3")
    t = pool_template([P["zen2"], P["zen3"]])
    assert t.xcr0 == 0x7 and {x.number: x.reason for x in t.left}[9].startswith(
        "KVM on zen2 does not offer it")


# -- QEMU -cpu ---------------------------------------------------------------------------------


def test_qemu_cpu_removes_the_flags_of_the_components_left_out() -> None:
    t = pool_template([P["zen4"], P["sapphire-rapids"]])
    assert t.to_qemu() == ("host,-avx512f,-pku,-amx-tile", (
        "on a CPU with AVX10 (CPUID.(7,1):EDX[19]) QEMU also enables the AVX-512 components "
        "for it: remove that flag too",))
    assert t.to_qemu("Icelake-Server")[0].startswith("Icelake-Server,-avx512f")
    # CET user state left out: a note, since QEMU 7.2 has no cet-ss property to remove.
    assert pool_template([P["zen2"], P["zen3"]]).to_qemu() == ("host,-pku", (
        "CET state left out (cet_user, cet_kernel): a QEMU that knows CET also needs "
        "-cet-ss,-cet-ibt; an older one (no cet-ss property) never offers it",))
    # A flag whose QEMU name is not known here becomes a note, not a guessed name.
    apx = replace(t, clear_flags=(("APX", (19,)),))
    cpu, notes = apx.to_qemu()
    assert cpu == "host" and notes == (
        "APX (CPUID.(EAX=0x7,ECX=0x1):EDX[21]) has no QEMU flag name known to fpstate: leave "
        "it out of the CPU model (apx)",)


@pytest.mark.parametrize("pair", list(itertools.combinations(sorted(P), 2)),
                         ids="+".join)
def test_qemu_flags_leave_exactly_the_template_xcr0(pair) -> None:
    """QEMU enables a component when its gating flag is set (x86_ext_save_areas[]): with the
    template's flags removed, what each host's KVM offers and QEMU still enables is the
    template's XCR0 -- every flag removed has a QEMU name."""
    from fpstate.tools.template import QEMU_CET, QEMU_FLAG, _gate_of

    t = pool_template([P[n] for n in pair])
    removed = {f for f, _ in t.clear_flags}
    assert removed <= set(QEMU_FLAG) | QEMU_CET
    for n in pair:
        offer = host_offer(P[n]).xcr0
        kept = sum(1 << i for i in range(64)
                   if (offer >> i) & 1 and _gate_of(i) not in removed)
        assert kept == t.xcr0, (n, hex(kept), hex(t.xcr0))


def test_cli_qemu(capsys) -> None:
    assert main(["template", "zen4", "sapphire-rapids", "--qemu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "-cpu host,-avx512f,-pku,-amx-tile" and out[1].startswith("# on a CPU")
    assert main(["template", "--check", "x.json", "zen4", "--qemu"]) == 2
    assert "--check takes no" in capsys.readouterr().err


def _qemu() -> str:
    import shutil

    q = shutil.which("qemu-system-x86_64")
    if q is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return q


def test_every_qemu_flag_name_is_one_real_qemu_knows() -> None:
    """The names come from QEMU's source; the QEMU installed here lists each of them."""
    import subprocess

    from fpstate.tools.template import QEMU_FLAG

    out = subprocess.run([_qemu(), "-cpu", "help"], capture_output=True, text=True,
                         check=True).stdout
    known = set(out.split("Recognized CPUID flags:")[1].split())
    assert set(QEMU_FLAG.values()) - known == set()


@pytest.mark.parametrize("pair", [("zen4", "sapphire-rapids"), ("zen2", "zen3"),
                                  ("haswell", "icelake-sp")], ids="+".join)
def test_real_qemu_takes_the_cpu_argument(pair) -> None:
    """QEMU (TCG: this machine's KVM is PVM, which QEMU cannot drive) accepts the -cpu line
    of the template on its 'max' model: it starts paused instead of refusing a property."""
    import subprocess

    cpu, _ = pool_template([P[n] for n in pair]).to_qemu("max")
    proc = subprocess.Popen([_qemu(), "-accel", "tcg", "-M", "pc", "-cpu", cpu, "-S",
                             "-display", "none", "-monitor", "none", "-serial", "none",
                             "-nodefaults"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _, err = proc.communicate(timeout=3)
        pytest.fail(f"qemu refused -cpu {cpu}: {err.strip()}")
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()


def _cpuid_boot_sector() -> bytes:
    """A boot sector that writes CPUID.(0DH,0):EAX as 8 hex digits and a newline to the debug
    console (port 0xE9), then exits QEMU through isa-debug-exit (port 0xF4). Real mode."""
    code = bytearray(b"\x31\xc0\x8e\xd8"                        # xor ax,ax; mov ds,ax
                     b"\x66\xb8\x0d\x00\x00\x00\x66\x31\xc9"    # mov eax,0xd; xor ecx,ecx
                     b"\x0f\xa2\x66\x89\xc3"                    # cpuid; mov ebx,eax
                     b"\xb9\x08\x00"                            # mov cx,8
                     b"\x66\xc1\xc3\x04\x88\xd8\x24\x0f"        # l: rol ebx,4; mov al,bl; and al,15
                     b"\x3c\x0a\x72\x02\x04\x07\x04\x30"        # cmp al,10; jb d; add al,7; d: +'0'
                     b"\xe6\xe9\xe2\xec"                        # out 0xe9,al; loop l
                     b"\xb0\x0a\xe6\xe9\xb0\x00\xe6\xf4"        # newline; exit
                     b"\xf4\xeb\xfd")                           # hlt
    return bytes(code) + bytes(510 - len(code)) + b"\x55\xaa"


def _qemu_leaf_0xd_eax(tmp_path, cpu: str) -> int:
    import subprocess

    boot, out = tmp_path / "boot.bin", tmp_path / f"{cpu}.txt"
    boot.write_bytes(_cpuid_boot_sector())
    subprocess.run([_qemu(), "-accel", "tcg", "-cpu", cpu, "-display", "none", "-nodefaults",
                    "-monitor", "none", "-serial", "none", "-drive",
                    f"format=raw,file={boot}", "-debugcon", f"file:{out}", "-device",
                    "isa-debug-exit,iobase=0xf4,iosize=0x04"], capture_output=True,
                   timeout=60, check=False)
    return int(out.read_text().split()[0], 16)


@pytest.mark.parametrize("pair", [("zen2", "zen3"), ("haswell", "zen4")], ids="+".join)
def test_real_qemu_leaf_0xd_loses_exactly_the_components_of_the_flags_removed(pair,
                                                                           tmp_path) -> None:
    """A guest of the real QEMU (TCG's 'max' model) reads CPUID.(0DH,0):EAX with and without
    the template's flags: what QEMU drops is exactly the components those flags gate (among
    those TCG has: x87, SSE, AVX, MPX, PKRU)."""
    from fpstate.tools.template import _gate_of

    t = pool_template([P[n] for n in pair])
    cpu, _ = t.to_qemu("max")
    removed = {f for f, _ in t.clear_flags}
    full = _qemu_leaf_0xd_eax(tmp_path, "max")
    assert full & 0x207 == 0x207  # x87, SSE, AVX and PKRU are TCG's
    gated = sum(1 << i for i in range(32) if (full >> i) & 1 and _gate_of(i) in removed)
    assert gated, "the pair must leave out something TCG has"
    assert _qemu_leaf_0xd_eax(tmp_path, cpu) == full & ~gated

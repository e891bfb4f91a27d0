"""fpu__init_system_xstate() on the 339 CPUs of cpuid-corpus.json, every modelled kernel.

Uses the gzipped copy of /work/shared/data/cpuid-corpus.json in tests/x86/data. Every entry the
dump parser accepts must size without an exception on every kernel version (a disable path is a
result, not an error). What each check compares, and what is excluded and why (the corpus
README's traps):

- the dumps were taken under Windows: sub-leaf 0 EBX and sub-leaf 1 EBX are sizes for the
  XCR0/IA32_XSS *Windows* enabled (Sapphire Rapids sub-leaf 1 EBX includes 128 bytes of
  Processor Trace state that Linux never enables), so they are never compared. The kernel reads
  those two registers after writing XCR0/IA32_XSS itself; the model answers them for Linux's
  values with the layout functions, and the kernel side recomputes them from its own tables:
  on a consistent dump the two must agree, so XSAVE must stay enabled;
- what a dump says independently of the OS is sub-leaf 0 ECX, the standard size of *every*
  supported user component: it must equal fpu_user_cfg.max_size wherever Linux enables all of
  them (219 consistent dumps). It does not where Linux drops one: Zen 2 / early Zen enumerate
  PKRU with CPUID.7.ECX.PKU = 0 (the kernel's gate is PKU/OSPKE), Bulldozer-family parts
  enumerate LWP (bit 62), which no kernel supports;
- dumps marked dump_consistent: false lack sub-leaves or read them as zero (hypervisor masking,
  truncated dump tools): they must still boot without an exception, and where the kernel gives
  up it is the paranoid size check, with a WARN naming the zero-sized component;
- one entry (a Hygon dump with a null register) is refused by the dump parser itself
  (ProfileError): there is no profile to boot.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from fpstate.errors import ProfileError
from fpstate.kernel.x86.versions import VERSION_NAMES
from fpstate.kernel.x86.xstate import elf_coredump_extra_notes, fpu__init_system_xstate
from fpstate.tools.corefile import LayoutNote, layout_problems
from fpstate.x86.layout import compacted_size, standard_size
from fpstate.x86.profiles.dumps import parse_corpus_object
from fpstate.x86.xfeatures import XFEATURE_MASK_LWP, XFEATURE_MASK_PKRU

DATA = Path(__file__).resolve().parents[1] / "x86" / "data" / "cpuid-corpus.json.gz"
CORPUS: list[dict[str, Any]] = json.loads(gzip.decompress(DATA.read_bytes()))


def _parse(entry: dict[str, Any]) -> Any:
    try:
        return parse_corpus_object(entry)
    except ProfileError as e:
        return e


PARSED = [(e, _parse(e)) for e in CORPUS]
BOOTABLE = [(e, p) for e, p in PARSED if not isinstance(p, ProfileError)]


def _id(item: tuple[dict[str, Any], Any]) -> str:
    return item[0]["source"].rsplit("/", 1)[-1].removesuffix("_CPUID.txt")[:60]


def test_population() -> None:
    refused = [(e, p) for e, p in PARSED if isinstance(p, ProfileError)]
    assert len(CORPUS) == 339 and len(BOOTABLE) == 338
    (entry, err), = refused
    assert entry["vendor"] == "hygon" and "not a hex string" in str(err)


@pytest.mark.parametrize("item", BOOTABLE, ids=_id)
def test_every_kernel_sizes_every_cpu(item: tuple[dict[str, Any], Any]) -> None:
    entry, p = item
    consistent = bool(entry.get("dump_consistent"))
    for version in VERSION_NAMES:
        r = fpu__init_system_xstate(p, version)
        k, u = r.fpu_kernel_cfg, r.fpu_user_cfg
        assert k.max_features & ~r.enumerated == 0
        assert not k.max_features & XFEATURE_MASK_LWP
        if r.disabled is not None:
            assert not consistent, (version, r.disabled, r.log)
            assert r.disabled == "paranoid_size"
            assert any("cpu state 0 bytes" in line for line in r.log), r.log
            continue
        assert u.max_features == k.max_features & ~0x1C00  # no user supervisor bits
        assert u.max_size == r.user_size_reported
        assert k.max_size == (r.kernel_size_reported if r.compacted else u.max_size)
        if not consistent:  # the layout functions refuse zero-sized sub-leaves
            continue
        assert u.max_size == standard_size(p, u.max_features)
        if r.compacted:
            assert k.max_size == compacted_size(p, k.max_features)
            assert k.default_size == compacted_size(p, k.default_features)
        else:
            assert k.max_features == u.max_features
        assert (u.max_features & XFEATURE_MASK_PKRU != 0) == p.has("PKU"), version
        if u.max_features == p.xcr0_supported:
            assert u.max_size == p.cpuid(0xD, 0)[2], (version, "sub-leaf 0 ECX")
        else:
            assert p.xcr0_supported & ~u.max_features & ~(XFEATURE_MASK_PKRU | XFEATURE_MASK_LWP) \
                == 0, (version, hex(p.xcr0_supported), hex(u.max_features))


def test_xeon_phi_dump_shows_the_v616_offset_order() -> None:
    """The broken Xeon Phi 7290 dump reads AVX-512 sub-leaves as zero (offset 0, size 0). Up to
    v6.15 xstate_calculate_size() takes the highest-numbered feature (Hi16_ZMM: 0 + 0) and the
    paranoid check fails against the CPU's 832; v6.16 walks xfeature_uncompact_order[] (sorted
    by offset), ends at YMM (576 + 256) and agrees."""
    p, = [p for e, p in BOOTABLE if "Xeon Phi(TM) CPU 7290" in e["cpu"]]
    old = fpu__init_system_xstate(p, "6.12")
    assert old.disabled == "paranoid_size"
    assert "XSAVE consistency problem: size 0 != kernel_size 832" in old.log
    new = fpu__init_system_xstate(p, "6.16")
    assert new.xsave_enabled and new.fpu_kernel_cfg.max_size == 832


def test_core_layout_notes_of_the_corpus() -> None:
    """elf_coredump_extra_notes() of 6.18 on every consistent dump: its records are the CPU's
    own leaf 0xD (EAX size, EBX offset) for each user feature Linux enables, with nothing a
    reader would doubt (layout_problems). The dumps whose cores lose their memory on 6.12-6.18
    (zero records, fixed by c8161e5304ab) are the Atoms and the Lakefield whose XSAVE has only
    x87 and SSE -- Elkhart Lake among them, the family of the x6425RE that fix names."""
    aborts = []
    for entry, profile in BOOTABLE:
        if not entry["dump_consistent"]:
            continue
        r = fpu__init_system_xstate(profile, "6.18")
        note = elf_coredump_extra_notes(r)
        assert [(c.type, c.size, c.offset) for c in note.records] == [
            (i, *profile.cpuid(0xD, i)[:2]) for i in range(2, 64)
            if r.fpu_user_cfg.max_features >> i & 1]
        assert layout_problems(LayoutNote(note.records, 0), r.fpu_user_cfg.max_features,
                               r.fpu_user_cfg.max_size) == ()
        if note.aborts:
            aborts.append(_id((entry, profile)))
            assert profile.xcr0_supported == 0x3
    assert sorted(aborts) == [
        "GenuineIntel00806A1_Lakefield", "GenuineIntel0090661_ElkhartLake_CPUID01.txt",
        "GenuineIntel00906C0_JasperLake_01", "GenuineIntel00906C0_JasperLake_06",
        "GenuineIntel00906C0_JasperLake_CPUID01.txt", "GenuineIntel00906C0_JasperLake_CPUID02.txt",
        "GenuineIntel00906C0_JasperLake_CPUID03.txt"]

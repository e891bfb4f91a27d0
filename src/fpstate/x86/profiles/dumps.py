"""CPUID dumps -> CpuidProfile: ``cpuid -r``, AIDA64/InstLatx64 text, corpus objects, profile JSON.

Formats (detected by :func:`detect_format`):

``cpuid-r``
    Todd Allen's ``cpuid -r`` (Debian package ``cpuid``): ``CPU 0:`` (or ``CPU:`` with ``-1``)
    blocks of ``   0x0000000d 0x01: eax=0x0000000f ebx=0x000009a8 ecx=0x00001800 edx=0x0``.
``aida64``
    AIDA64's CPUID dump, as collected by InstLatx64: ``------[ ... Logical CPU #0 ]------``
    blocks of ``CPUID 0000000D: 000602E7-00002B00-00002B00-00000000 [SL 00] [x87]``. Old AIDA64
    versions print no ``[SL nn]``: repeated lines of one leaf are then its sub-leaves 0, 1, 2...,
    except leaf 0xD, for which those versions printed only the *non-zero* sub-leaves among 0..2.
    There a second line that reads (256, 576, 0, 0) is sub-leaf 2 (AVX: 256 bytes at 576; it
    cannot be sub-leaf 1, whose EAX is a bitmap of bits 0-4); any other second line is sub-leaf 1.
``corpus-json``
    An object (or a list of them) of /work/shared/data/cpuid-corpus.json: ``cpuid_raw_cpu0``
    (leaf -> sub-leaf -> [EAX, EBX, ECX, EDX]) and ``leaf_0xd`` (the checked copy of leaf 0xD,
    which replaces the raw one).
``profile-json``
    :meth:`CpuidProfile.to_json` output (the bundled profiles).

Only logical CPU #0 is read. Every failure is a ProfileError with a one-line message that names
the line or field; a dump is *truncated* when it lacks leaf 0, leaf 1, the highest basic leaf
that leaf 0 announces, or (when leaf 0x80000000 is present) the highest extended leaf.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from fpstate.errors import ProfileError
from fpstate.x86.cpuid import FORMAT, CpuidProfile, LeafTable, Regs, vendor_of

FORMATS: tuple[str, ...] = ("cpuid-r", "aida64", "corpus-json", "profile-json")

_CPUID_R_LINE = re.compile(
    r"^\s*0x([0-9a-fA-F]{1,8})\s+0x([0-9a-fA-F]{1,8}):\s+eax=0x([0-9a-fA-F]{1,8})\s+"
    r"ebx=0x([0-9a-fA-F]{1,8})\s+ecx=0x([0-9a-fA-F]{1,8})\s+edx=0x([0-9a-fA-F]{1,8})\s*$"
)
_CPUID_R_CPU = re.compile(r"^CPU(?:\s+(\d+))?:\s*$")
_AIDA_LINE = re.compile(
    r"^CPUID ([0-9A-Fa-f]{8}): ([0-9A-Fa-f]{8})-([0-9A-Fa-f]{8})-([0-9A-Fa-f]{8})-"
    r"([0-9A-Fa-f]{8})(?:\s+\[SL ([0-9A-Fa-f]{2})\])?(?:\s+\[.*\]?.*)?\s*$"
)
_AIDA_HEADER = re.compile(r"^-+\[\s*(.*?)\s*\]-+\s*$")
_AIDA_CPU = re.compile(r"Logical CPU #(\d+)\b")


def _show(line: str) -> str:
    line = line.strip()
    return repr(line if len(line) <= 60 else line[:57] + "...")


def check_complete(leaves: Mapping[tuple[int, int], Regs], what: str, *, last: bool) -> None:
    """ProfileError unless ``leaves`` holds leaf 0 and leaf 1 and, when ``last``, the highest
    basic leaf that leaf 0 announces (and the highest extended leaf when leaf 0x80000000 is
    there): the test for a dump cut short."""
    if (0, 0) not in leaves:
        raise ProfileError(f"{what}: truncated or garbled: no CPUID leaf 0")
    top = leaves[(0, 0)][0]
    need = [(1, 0, top)] if top >= 1 else []
    if last and top >= 1:
        need.append((top, 0, top))
    if last and (0x80000000, 0) in leaves:
        ext = leaves[(0x80000000, 0)][0]
        if 0x80000000 <= ext <= 0x8000FFFF:
            need.append((ext, 0x80000000, ext))
    present = {leaf for leaf, _ in leaves}
    for leaf, base, end in need:
        if leaf not in present:
            raise ProfileError(
                f"{what}: truncated: CPUID leaf {leaf:#x} is missing (leaf {base:#x} announces "
                f"leaves up to {end:#x})"
            )


def _put(leaves: dict[tuple[int, int], Regs], key: tuple[int, int], regs: Regs, where: str) -> None:
    if key in leaves:
        raise ProfileError(f"{where}: CPUID leaf {key[0]:#x} sub-leaf {key[1]:#x} appears twice")
    leaves[key] = regs


def parse_cpuid_r(text: str, name: str, source: str) -> CpuidProfile:
    """A profile from ``cpuid -r`` output (the first CPU block, i.e. CPU 0)."""
    leaves: dict[tuple[int, int], Regs] = {}
    in_block = False
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        head = _CPUID_R_CPU.match(line.strip())
        if head:
            if in_block:
                break  # the next CPU's block: CPU 0 is complete
            in_block = True
            continue
        where = f"{source} line {n}"
        if not in_block:
            raise ProfileError(f"{where}: expected a 'CPU 0:' header, found {_show(line)}")
        m = _CPUID_R_LINE.match(line)
        if not m:
            raise ProfileError(f"{where}: not a 'cpuid -r' register line: {_show(line)}")
        leaf, sub, *regs = (int(g, 16) for g in m.groups())
        _put(leaves, (leaf, sub), tuple(regs), where)  # type: ignore[arg-type]
    if not in_block:
        raise ProfileError(f"{source}: no 'CPU 0:' block")
    check_complete(leaves, source, last=True)
    return CpuidProfile.from_leaves(name, leaves, source)


def _aida_cpu0_lines(text: str) -> tuple[list[tuple[int, str]], bool]:
    """The numbered lines of logical CPU #0's block (or, without CPU headers, of the first CPU:
    everything up to the second CPUID leaf 0 line), and whether something follows the block
    (a next header or CPU), i.e. whether the block is known to be whole."""
    lines = list(enumerate(text.splitlines(), 1))
    headers = [(i, _AIDA_HEADER.match(line)) for i, (_, line) in enumerate(lines)]
    cpu_heads = [(i, m) for i, m in headers if m and _AIDA_CPU.search(m.group(1))]
    if cpu_heads:
        zero = [i for i, m in cpu_heads if _AIDA_CPU.search(m.group(1)).group(1) == "0"]  # type: ignore[union-attr]
        start = zero[0] if zero else cpu_heads[0][0]
        end = next((i for i, m in headers if m and i > start), len(lines))
        return lines[start + 1:end], end < len(lines)
    out: list[tuple[int, str]] = []
    seen_zero = False
    for n, line in lines:
        if line.startswith("CPUID 00000000:"):
            if seen_zero:
                return out, True
            seen_zero = True
        out.append((n, line))
    return out, False


def parse_aida64(text: str, name: str, source: str) -> CpuidProfile:
    """A profile from an AIDA64/InstLatx64 CPUID dump (logical CPU #0)."""
    rows: list[tuple[int, int | None, Regs, str]] = []
    block, whole = _aida_cpu0_lines(text)
    for n, line in block:
        if not line.startswith("CPUID"):
            continue
        where = f"{source} line {n}"
        m = _AIDA_LINE.match(line.rstrip())
        if not m:
            raise ProfileError(f"{where}: not an AIDA64 CPUID line: {_show(line)}")
        leaf, a, b, c, d = (int(g, 16) for g in m.groups()[:5])
        sub = int(m.group(6), 16) if m.group(6) is not None else None
        rows.append((leaf, sub, (a, b, c, d), where))
    if not rows:
        raise ProfileError(f"{source}: no 'CPUID xxxxxxxx:' lines for logical CPU #0")
    leaves: dict[tuple[int, int], Regs] = {}
    counters: dict[int, int] = {}
    for leaf, sub, regs, where in rows:
        if sub is None:
            sub = counters.get(leaf, 0)
            if leaf == 0xD and sub == 1 and regs[:2] == (256, 576) and (0xD, 1) not in leaves:
                sub = 2  # old AIDA64: zero sub-leaf 1 not printed; this is AVX's sub-leaf 2
        counters[leaf] = sub + 1
        _put(leaves, (leaf, sub), regs, where)
    # AIDA64 skips leaves it does not know (a dump may lack the top leaf): only a block that
    # runs into the end of the file must show the last leaves to count as whole.
    check_complete(leaves, source, last=not whole)
    return CpuidProfile.from_leaves(name, leaves, source)


def _corpus_hex(value: Any, where: str) -> int:
    if not isinstance(value, str):
        raise ProfileError(f"{where}: {value!r} is not a hex string")
    try:
        number = int(value, 16)
    except ValueError:
        raise ProfileError(f"{where}: {value!r} is not a hex number") from None
    if not 0 <= number <= 0xFFFFFFFF:
        raise ProfileError(f"{where}: {value!r} is not a 32-bit value")
    return number


def _corpus_subleaves(subs: Any, where: str) -> dict[int, Regs]:
    if not isinstance(subs, Mapping):
        raise ProfileError(f"{where}: not an object of sub-leaves")
    out: dict[int, Regs] = {}
    for sub_s, regs in subs.items():
        w = f"{where} sub-leaf {sub_s!r}"
        if not isinstance(sub_s, str) or not sub_s.isdigit() or len(sub_s) > 10:
            raise ProfileError(f"{w}: sub-leaf is not a decimal number")
        if not isinstance(regs, list) or len(regs) != 4:
            raise ProfileError(f"{w}: not a list of 4 registers")
        out[int(sub_s)] = tuple(_corpus_hex(r, w) for r in regs)  # type: ignore[assignment]
    return out


def parse_corpus_object(obj: Any, name: str | None = None, source: str | None = None) -> (
        CpuidProfile):
    """A profile from one object of cpuid-corpus.json (leaf 0xD from its checked ``leaf_0xd``)."""
    if not isinstance(obj, Mapping):
        raise ProfileError("corpus entry is not an object")
    src = source if source is not None else obj.get("source")
    if not isinstance(src, str):
        raise ProfileError("corpus entry: field 'source' is missing or not a string")
    label = name or obj.get("microarch_tag") or obj.get("cpu")
    if not isinstance(label, str) or not label:
        raise ProfileError(f"{src}: corpus entry has no 'microarch_tag' or 'cpu' to name it")
    raw = obj.get("cpuid_raw_cpu0", {})
    if not isinstance(raw, Mapping):
        raise ProfileError(f"{src}: field 'cpuid_raw_cpu0' is not an object")
    leaves: dict[tuple[int, int], Regs] = {}
    for leaf_s, subs in raw.items():
        where = f"{src}: cpuid_raw_cpu0 leaf {leaf_s!r}"
        leaf = _corpus_hex(leaf_s, where)
        for sub, regs in _corpus_subleaves(subs, where).items():
            leaves[(leaf, sub)] = regs
    if "leaf_0xd" in obj:
        leaves = {k: v for k, v in leaves.items() if k[0] != 0xD}
        for sub, regs in _corpus_subleaves(obj["leaf_0xd"], f"{src}: leaf_0xd").items():
            leaves[(0xD, sub)] = regs
    if raw:
        check_complete(leaves, src, last=False)
    elif (0xD, 0) not in leaves:
        raise ProfileError(f"{src}: corpus entry has neither 'cpuid_raw_cpu0' nor leaf 0xD")
    table = LeafTable(leaves)
    vendor = vendor_of(table)
    if vendor == "unknown" and obj.get("vendor") in ("intel", "amd", "hygon"):
        vendor = obj["vendor"]
    return CpuidProfile(name=label, vendor=vendor, leaves=table, source=src)


def _select(entries: list[Any], selector: str | None, source: str) -> Any:
    if selector is None:
        if len(entries) == 1:
            return entries[0]
        raise ProfileError(
            f"{source} holds {len(entries)} CPUs: choose one with PATH#INDEX or PATH#TEXT "
            "(TEXT found in one entry's source or cpu)"
        )
    if selector.isdigit():
        i = int(selector)
        if i < len(entries):
            return entries[i]
        raise ProfileError(f"{source}: entry #{i} does not exist ({len(entries)} entries)")
    hits = [e for e in entries if isinstance(e, Mapping) and any(
        selector.lower() in str(e.get(k, "")).lower() for k in ("source", "cpu"))]
    if len(hits) != 1:
        raise ProfileError(f"{source}: {selector!r} matches {len(hits)} entries, not 1")
    return hits[0]


def detect_format(text: str) -> str:
    """The format of a dump (one of :data:`FORMATS`); ProfileError when it is none of them."""
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ProfileError(f"JSON does not parse: {str(e)[:80]}") from None
        first = data[0] if isinstance(data, list) and data else data
        if isinstance(first, Mapping) and first.get("format") == FORMAT:
            return "profile-json"
        if isinstance(first, Mapping) and ("cpuid_raw_cpu0" in first or "leaf_0xd" in first):
            return "corpus-json"
        raise ProfileError(
            f"JSON is neither an fpstate profile (format {FORMAT!r}) nor a cpuid-corpus entry"
        )
    for line in text.splitlines()[:400]:
        if _CPUID_R_LINE.match(line) or _CPUID_R_CPU.match(line.strip()):
            return "cpuid-r"
        if line.startswith("CPUID ") and re.match(r"CPUID [0-9A-Fa-f]{8}: ", line):
            return "aida64"
    raise ProfileError(
        "unrecognised CPUID dump: expected 'cpuid -r' output, an AIDA64/InstLatx64 dump, "
        "a cpuid-corpus.json entry or an fpstate profile JSON"
    )


def parse_dump(text: str, name: str, source: str, selector: str | None = None) -> CpuidProfile:
    """A profile from ``text`` in any supported format (auto-detected)."""
    if "\0" in text:
        raise ProfileError(f"{source}: binary data (NUL bytes), not a CPUID dump")
    try:
        fmt = detect_format(text)
    except ProfileError as e:
        raise ProfileError(f"{source}: {e}") from None
    if fmt == "cpuid-r":
        return parse_cpuid_r(text, name, source)
    if fmt == "aida64":
        return parse_aida64(text, name, source)
    data = json.loads(text)
    if fmt == "profile-json":
        if isinstance(data, list):
            data = _select(data, selector, source)
        return CpuidProfile.from_json(data)
    entries = data if isinstance(data, list) else [data]
    entry = _select(entries, selector, source)
    # An entry of the corpus names its own source; one a user wrote may not: then the file.
    own = entry.get("source") if isinstance(entry, Mapping) else None
    return parse_corpus_object(entry, source=own if isinstance(own, str) else source)

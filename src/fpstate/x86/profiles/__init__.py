"""Bundled CPU profiles and the one loader for every way of naming a CPU.

``load_profile(spec)`` takes:

- ``"host"``: this CPU, by executing CPUID (``fpstate.host.cpuid.host_profile``);
- a bundled name (:func:`list_profiles`): a JSON file of this directory;
- a path to a dump in any supported format (``fpstate.x86.profiles.dumps``), gzipped or not,
  optionally followed by ``#INDEX`` or ``#TEXT`` to pick one CPU of a file that holds several
  (the cpuid-corpus.json list: ``cpuid-corpus.json#SapphireRapids_05``).

The bundled profiles are CPU #0 of real InstLatx64 AIDA64 dumps (commit 087af2c), taken from
cpuid-corpus.json (its checked ``leaf_0xd`` replaces the raw leaf 0xD); :data:`BUNDLED` names
the dump of each, and :func:`build_bundled` regenerates the files from the corpus. All were
taken under Windows, so OS-dependent bits are Windows' (OSXSAVE set, OSPKE clear, leaf 0xD
sub-leaf 0/1 EBX for Windows' XCR0/IA32_XSS); the enumeration of components does not depend
on the OS.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path

from fpstate.errors import ProfileError
from fpstate.inputs import read_bytes
from fpstate.x86.cpuid import CpuidProfile
from fpstate.x86.profiles.dumps import parse_corpus_object, parse_dump

HERE = Path(__file__).resolve().parent

#: Bundled name -> file of the InstLatx64 collection whose corpus entry it is made from.
BUNDLED: dict[str, str] = {
    "haswell": "GenuineIntel/GenuineIntel00306C3_Haswell_CPUID.txt",  # Core i7-4770
    "skylake-sp": "GenuineIntel/GenuineIntel0050654_SkylakeXeon_CPUID6.txt",  # Xeon Platinum 8180
    "icelake-sp": "GenuineIntel/GenuineIntel00606A6_ICX_CPUID3.txt",  # Xeon Platinum 8351N
    "sapphire-rapids": "GenuineIntel/GenuineIntel00806F8_SapphireRapids_05_CPUID.txt",  # w7-2475X
    "emerald-rapids": "GenuineIntel/GenuineIntel00C06F2_EmeraldRapids_03_CPUID.txt",  # 8570
    "granite-rapids": "GenuineIntel/GenuineIntel00A06D1_GraniteRapids_03_CPUID.txt",  # Xeon 658X
    "alder-lake": "GenuineIntel/GenuineIntel0090672_AlderLake_01_LC_BC_CPUID.txt",  # i9-12900K
    "zen2": "AuthenticAMD/AuthenticAMD0830F10_K17_Rome_CPUID.txt",  # EPYC 7742
    "zen3": "AuthenticAMD/AuthenticAMD0A00F11_K19_Milan_02_CPUID.txt",  # EPYC 7763
    "zen4": "AuthenticAMD/AuthenticAMD0A10F11_K19_Genoa_01_CPUID.txt",  # EPYC 9654
    "zen5": "AuthenticAMD/AuthenticAMD0B00F21_K20_Turin_01_CPUID.txt",  # EPYC 9655
}

#: The bundled profile that stands in for the host where CPUID cannot be executed.
FALLBACK = "zen4"


def list_profiles() -> list[str]:
    """The names of the bundled profiles, sorted."""
    return sorted(p.stem for p in HERE.glob("*.json"))


def bundled_profile(name: str) -> CpuidProfile:
    """The bundled profile ``name``; ProfileError listing the known names if there is none."""
    path = HERE / f"{name}.json"
    if not path.is_file():
        raise ProfileError(f"unknown profile {name!r} (bundled: {', '.join(list_profiles())})")
    return CpuidProfile.from_json(path.read_text())


def load_path(spec: str) -> CpuidProfile:
    """A profile from a dump file ``PATH`` or ``PATH#SELECTOR`` (any supported format)."""
    path_s, _, selector = spec.partition("#")
    path = Path(path_s)
    try:
        data = read_bytes(path)
    except OSError as e:
        raise ProfileError(f"cannot read {path_s}: {e.strerror or e}") from None
    if data[:2] == b"\x1f\x8b":  # gzip (the test copy of cpuid-corpus.json is gzipped)
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise ProfileError(f"{path_s}: broken gzip data: {e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return parse_dump(text, name=path.stem, source=str(path), selector=selector or None)


def load_profile(spec: str) -> CpuidProfile:
    """``"host"``, a bundled name, or a path (``PATH[#SELECTOR]``) -> a CpuidProfile."""
    if spec == "host":
        from fpstate.host.cpuid import host_profile

        return host_profile()
    if spec in list_profiles():
        return bundled_profile(spec)
    path_s = spec.partition("#")[0]
    if path_s and Path(path_s).exists():
        return load_path(spec)
    raise ProfileError(
        f"unknown profile {spec!r}: not 'host', a bundled profile "
        f"({', '.join(list_profiles())}) or an existing file"
    )


def build_bundled(corpus: Path, out_dir: Path = HERE) -> list[Path]:
    """Write the :data:`BUNDLED` profiles from ``corpus`` (cpuid-corpus.json) into ``out_dir``."""
    entries = json.loads(Path(corpus).read_text())
    written = []
    for name, dump in BUNDLED.items():
        hits = [e for e in entries if str(e.get("source", "")).endswith(":" + dump)]
        if len(hits) != 1:
            raise ProfileError(f"{corpus}: {dump} matches {len(hits)} entries, not 1")
        entry = parse_corpus_object(hits[0])
        profile = CpuidProfile(name=name, vendor=entry.vendor, leaves=entry.leaves,
                               source=entry.source + " (via cpuid-corpus.json, CPU #0)")
        out = Path(out_dir) / f"{name}.json"
        out.write_text(profile.to_json())
        written.append(out)
    return written

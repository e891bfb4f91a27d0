"""Bad input to every tool is one line on stderr naming what is wrong, and exit status 2:
nonexistent files, truncated blobs, unknown formats and CPUs, bad JSON for encode, translate and
compat, bad workload files for cost. Also fuzzing of the parsers that the other test files do
not reach: state-record JSON and record_from_blob over random bytes raise only BlobError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fpstate.cli import main
from fpstate.errors import BlobError
from fpstate.tools.blob import FORMATS
from fpstate.tools.record import RECORD_FORMAT, StateRecord, record_from_blob, translate
from fpstate.x86.profiles import bundled_profile, list_profiles

PROFILES = {n: bundled_profile(n) for n in list_profiles()}


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    out = {
        "trunc": b"\x7f" * 300,  # shorter than a legacy region + header
        "blob": bytes(2440),
        "badjson": b'{"format": ',
        "badlist": b"[1,",
        "binary": bytes(range(256)) * 4,
        "neg": b"mixes: [{threads: -1}]\n",
        "share": b'{"mixes": [{"threads": 4, "avx512_share": 0.7, "amx_share": 0.7}]}',
        "unknownfield": b"mixes: [{threads: 4, gpus: 2}]\n",
        "nomixes": b"cpu: zen4\n",
        "badyaml": b"mixes: [\n",
        "notrecord": json.dumps({"format": "something-else"}).encode(),
    }
    paths = {}
    for name, data in out.items():
        p = d / name
        p.write_bytes(data)
        paths[name] = p
    return paths


CASES = [
    (["decode", "{missing}"], "cannot read"),
    (["decode", "{trunc}", "--cpu", "zen4"], "blob is 300 bytes"),
    (["decode", "{blob}", "--cpu", "zen4", "--format", "fxsave"], "invalid choice: 'fxsave'"),
    (["decode", "{blob}", "--cpu", "pentium"], "unknown profile 'pentium'"),
    (["decode", "pid:x"], "pid:TID needs a thread id"),
    (["decode", "{blob}", "--cpu", "zen4", "--xcr0", "avx|bogus"],
     "argument --xcr0: mask 'avx|bogus'"),
    (["decode", "kvm:x"], "kvm:SEED needs a number"),
    (["encode", "{missing}"], "cannot read"),
    (["encode", "{badjson}", "--cpu", "zen4"], "blob JSON does not parse"),
    (["encode", "{badlist}", "--cpu", "zen4"], "blob JSON does not parse"),
    (["encode", "{binary}", "--cpu", "zen4"], "cannot read"),
    (["encode", "{notrecord}", "--cpu", "zen4"], "field 'format'"),
    (["encode", "{badjson}", "--cpu", "pentium"], "unknown profile 'pentium'"),
    (["encode", "{badjson}", "--format", "fxsave"], "invalid choice: 'fxsave'"),
    (["validate", "{missing}", "--as", "ptrace"], "cannot read"),
    (["validate", "{trunc}", "--cpu", "zen4", "--as", "ptrace"], "576-byte"),
    (["validate", "{blob}", "--cpu", "pentium", "--as", "kvm"], "unknown profile 'pentium'"),
    (["validate", "{blob}", "--cpu", "zen4", "--as", "execve"], "invalid choice: 'execve'"),
    (["validate", "{blob}", "--cpu", "zen4", "--as", "kvm", "--kernel", "6.1"],
     "the KVM model is of kernel"),
    (["record", "{missing}"], "cannot read"),
    (["record", "{trunc}", "--cpu", "zen4"], "blob is 300 bytes"),
    (["record", "{blob}", "--cpu", "pentium"], "unknown profile 'pentium'"),
    (["record", "{blob}", "--cpu", "zen4", "--format", "fxsave"], "invalid choice"),
    (["translate", "{missing}", "--to", "zen4"], "cannot read"),
    (["translate", "{badjson}", "--to", "zen4"], "state record JSON does not parse"),
    (["translate", "{binary}", "--to", "zen4"], "state record JSON does not parse"),
    (["translate", "{notrecord}", "--to", "zen4"], "not a state record"),
    (["translate", "{badjson}", "--to", "zen4", "--layout", "packed"], "invalid choice"),
    (["sizes", "--cpu", "pentium"], "unknown profile 'pentium'"),
    (["sizes", "--cpu", "zen4", "--kernel", "2.6"], "invalid choice: '2.6'"),
    (["sizes", "--cpu", "{binary}"], "not a CPUID dump"),
    (["compat", "pentium", "zen4"], "unknown profile 'pentium'"),
    (["compat", "zen4", "{missing}"], "unknown profile"),
    (["compat", "zen4", "{binary}"], "not a CPUID dump"),
    (["compat", "zen4", "{badjson}"], "JSON does not parse"),
    (["cost", "--workload", "{missing}"], "cannot read"),
    (["cost", "--workload", "{binary}"], "cannot read"),
    (["cost", "--workload", "{badyaml}"], "not YAML/JSON"),
    (["cost", "--workload", "{neg}"], "threads must be a count, not -1"),
    (["cost", "--workload", "{share}"], "avx512_share + amx_share exceeds 1"),
    (["cost", "--workload", "{unknownfield}"], "unknown field(s) gpus"),
    (["cost", "--workload", "{nomixes}"], "non-empty 'mixes' list"),
    (["cost", "--cpu", "pentium"], "unknown profile 'pentium'"),
    (["cost", "--kernel", "2.6"], "invalid choice: '2.6'"),
]


@pytest.mark.parametrize("argv, message", CASES, ids=[" ".join(c[0][:2]) + f" #{i}"
                                                     for i, c in enumerate(CASES)])
def test_one_line_and_exit_2(argv: list[str], message: str, files, capsys) -> None:
    paths = {k: str(v) for k, v in files.items()} | {"missing": "/nonexistent/x.bin"}
    argv = [a.format(**paths) for a in argv]
    with pytest.raises(SystemExit) as e:
        raise SystemExit(main(argv))
    assert e.value.code == 2, argv
    cap = capsys.readouterr()
    assert cap.err.count("\n") == 1 and cap.err.startswith("fpstate: error: "), cap.err
    assert message in cap.err, cap.err
    assert cap.out == ""


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.binary(max_size=13000), name=st.sampled_from(sorted(PROFILES)),
       fmt=st.sampled_from(("auto", *FORMATS)))
def test_record_from_random_bytes_raises_only_blob_error(data: bytes, name: str,
                                                         fmt: str) -> None:
    try:
        record_from_blob(data, PROFILES[name], fmt)
    except BlobError:
        pass


_HEX = st.integers(0, 2**64 - 1).map(hex)
_JUNK = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6),
                  st.lists(st.integers(), max_size=3))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(xcr0=st.one_of(_HEX, _JUNK), xss=st.one_of(_HEX, _JUNK),
       layout=st.one_of(st.sampled_from(["standard", "compacted"]), _JUNK),
       sub=st.integers(0, 20), regs=st.lists(st.integers(0, 2**32 - 1).map(hex), min_size=0,
                                             max_size=5),
       state=st.binary(max_size=3000).map(bytes.hex), target=st.sampled_from(sorted(PROFILES)),
       to=st.sampled_from(["standard", "compacted"]))
def test_random_state_records_raise_only_blob_error(xcr0, xss, layout, sub, regs, state,
                                                    target, to) -> None:
    """Records whose CPUID, XCR0/IA32_XSS, layout and state bytes are random: parsing, the
    record's own CPU profile and translation raise BlobError or work."""
    obj = {"format": RECORD_FORMAT, "cpu": "x", "vendor": "intel", "xcr0": xcr0, "xss": xss,
           "layout": layout, "cpuid": {"0xd": {"0x0": ["0x7", "0x340", "0x340", "0x0"],
                                                hex(sub): regs}},
           "state": state}
    try:
        rec = StateRecord.from_json(json.dumps(obj))
        rec.profile()
        translate(rec, PROFILES[target], to)
    except BlobError:
        pass

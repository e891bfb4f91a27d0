"""The kernel-log reader (fpstate.host.dmesg) and the boot-lines differential case.

The parser is tested everywhere (fixed logs in each format, hypothesis fuzzing); the
differential case, fpu__init_system_xstate() on this CPU for the running kernel against the
``x86/fpu:`` lines of this kernel's log, runs on the host and skips with the reason where the
log cannot be read (kernel.dmesg_restrict, no /dev/kmsg) or no longer holds the boot lines.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fpstate.cli import main
from fpstate.errors import HostUnavailable
from fpstate.host import native
from fpstate.host.dmesg import (
    _read_kmsg,
    compare_boot_lines,
    fpu_lines,
    message_of,
    oldest_record_is_fpu_line,
)

ENABLED = ("x86/fpu: Enabled xstate features 0x18e7, context size is 2472 bytes, using "
           "'compacted' format.")

DMESG = f"""\
[    0.000000] Linux version 6.18.44 (gcc) #1 SMP
[    0.000000] x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'
[    0.000000] x86/fpu: xstate_offset[2]:  576, xstate_sizes[2]:  256
[    0.000000] x86/fpu: {ENABLED[9:]}
[    0.001234] signal: max sigframe size: 3376
"""

KMSG = f"""\
6,1,0,-;Linux version 6.18.44 (gcc) #1 SMP
6,12,0,-;x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'
 SUBSYSTEM=cpu
6,13,0,-,caller=T0;x86/fpu: xstate_offset[2]:  576, xstate_sizes[2]:  256
6,14,0,c;{ENABLED}
"""

EXPECTED = (
    "x86/fpu: Supporting XSAVE feature 0x001: 'x87 floating point registers'",
    "x86/fpu: xstate_offset[2]:  576, xstate_sizes[2]:  256",
    ENABLED,
)


@pytest.mark.parametrize("text", [
    DMESG,
    KMSG,
    DMESG.replace("[    0.000000] ", "[Tue Nov 19 19:51:02 2025] "),  # dmesg -T
    DMESG.replace("[    0.000000] ", "[    0.000000][    T0] "),  # CONFIG_PRINTK_CALLER
    DMESG.replace("[    0.000000] ", "<6>[    0.000000] "),  # dmesg -r
])
def test_fpu_lines_of_every_log_format(text: str) -> None:
    assert fpu_lines(text) == EXPECTED


def test_message_of_keeps_the_text_after_the_timestamp() -> None:
    assert message_of("[   12.345678] x86/fpu: a [b] c\n") == "x86/fpu: a [b] c"
    assert message_of("4,99,123456,-;x86/fpu: xfeatures modified") == "x86/fpu: xfeatures modified"
    assert fpu_lines("x86/fpux: not ours\nfoo x86/fpu: not at the start\n") == ()
    assert message_of("<6>x86/fpu: no time (printk.time=0)") == "x86/fpu: no time (printk.time=0)"
    assert message_of("[    T0] x86/fpu: caller only") == "x86/fpu: caller only"
    # Records are "\\n"-separated; U+2028 inside a message does not split it.
    assert fpu_lines("[    0.1] x\n[    0.000001] x86/fpu: a\u2028b\n") == ("x86/fpu: a\u2028b",)


#: Any message text. Excluded: line breaks and other control characters (the kernel's syslog
#: format splits a record at "\\n"; dmesg escapes the rest), surrogates (not text), and a message
#: that itself begins with a caller-id-shaped "[    T0]", which no reader can tell from
#: CONFIG_PRINTK_CALLER's field (util-linux dmesg cannot either).
_MESSAGE = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=60).filter(
    lambda m: re.match(r"\[ *[TC]\d+\]", m) is None)


@given(ts=st.floats(0, 99999, allow_nan=False), msg=_MESSAGE)
def test_timestamp_is_stripped_from_any_message(ts: float, msg: str) -> None:
    # print_time() + ONE space (info_print_prefix); whatever follows, leading blanks, U+00A0,
    # brackets or trailing spaces included, is the message.
    assert message_of(f"[{ts:12.6f}] {msg}") == msg
    assert message_of(f"<6>[{ts:12.6f}][    T1] {msg}") == msg
    assert message_of(f"[{ts:12.6f}] [    T1] {msg}") == msg


def _msg_add_ext_text(text: str) -> str:
    """What /dev/kmsg writes for a message (msg_add_ext_text: bytes < 0x20, >= 0x7f and the
    backslash as "\\xNN")."""
    return "".join(f"\\x{b:02x}" if b < 0x20 or b >= 0x7f or b == 0x5c else chr(b)
                   for b in text.encode("utf-8"))


@given(seq=st.integers(0, 2**32), usec=st.integers(0, 2**40),
       msg=st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_kmsg_record_text_is_unescaped_to_the_message(seq: int, usec: int, msg: str) -> None:
    assert message_of(f"6,{seq},{usec},-;{_msg_add_ext_text(msg)}\n") == msg
    assert message_of(f"4,{seq},{usec},c,caller=T17;{_msg_add_ext_text(msg)}") == msg


def test_a_message_that_starts_with_a_tab_keeps_it_in_both_formats() -> None:
    # As this kernel logs it: /dev/kmsg "6,91,241258,-;\\x09Trampoline variant of Tasks RCU
    # enabled.", dmesg "[    0.241258] \tTrampoline variant of Tasks RCU enabled."
    msg = "\tTrampoline variant of Tasks RCU enabled."
    assert message_of("6,91,241258,-;\\x09Trampoline variant of Tasks RCU enabled.") == msg
    assert message_of("[    0.241258] \tTrampoline variant of Tasks RCU enabled.") == msg
    assert message_of("[    0.201607]   #1  #3  #5  #7") == "  #1  #3  #5  #7"
    assert message_of("[    0.000000] [Firmware Bug]: TSC doesn't count") == \
        "[Firmware Bug]: TSC doesn't count"


@given(st.text(max_size=400))
def test_fpu_lines_never_fails_and_only_returns_fpu_lines(text: str) -> None:
    lines = fpu_lines(text)
    assert all(line.startswith("x86/fpu: ") and "\n" not in line for line in lines)


def test_unreadable_kmsg_is_host_unavailable_with_the_path() -> None:
    with pytest.raises(HostUnavailable, match=r"cannot open /nonexistent/kmsg: No such file"):
        _read_kmsg("/nonexistent/kmsg")


# -- the differential case: model against this kernel ------------------------------------------


@pytest.fixture(scope="module")
def boot_lines() -> tuple[tuple[str, ...], tuple[str, ...]]:
    if not native.is_x86_64():
        pytest.skip(f"host is {os.uname().machine}, not x86-64: no CPUID to model")
    try:
        return compare_boot_lines()
    except HostUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.host
def test_model_boot_lines_equal_this_kernels_dmesg(
        boot_lines: tuple[tuple[str, ...], tuple[str, ...]]) -> None:
    model, host = boot_lines
    assert model == host
    assert host[-1].startswith("x86/fpu: Enabled xstate features ")


@pytest.mark.host
def test_boot_log_compare_exits_0_on_this_host(
        boot_lines: tuple[tuple[str, ...], tuple[str, ...]],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["boot-log", "--compare"]) == 0
    assert capsys.readouterr().out.startswith(f"identical: {len(boot_lines[1])} x86/fpu lines")


def test_a_log_whose_oldest_record_is_an_fpu_line_may_be_truncated() -> None:
    """The ring buffer drops the oldest records first: a log that begins inside the x86/fpu
    block may have lost its first lines, and comparing the rest would be a false mismatch."""
    assert not oldest_record_is_fpu_line(DMESG) and not oldest_record_is_fpu_line(KMSG)
    wrapped = "".join(DMESG.splitlines(keepends=True)[2:])
    assert wrapped.startswith("[    0.000000] x86/fpu: xstate_offset[2]")
    assert oldest_record_is_fpu_line(wrapped)
    kmsg_wrapped = "".join(KMSG.splitlines(keepends=True)[3:])
    assert oldest_record_is_fpu_line(kmsg_wrapped)
    assert not oldest_record_is_fpu_line("")


def test_truncated_log_is_neither_used_nor_kept(monkeypatch: pytest.MonkeyPatch,
                                                tmp_path) -> None:
    from fpstate.host import dmesg

    kept = tmp_path / "boot-lines.txt"
    monkeypatch.setattr(dmesg, "_cache_path", lambda: str(kept))
    wrapped = "".join(DMESG.splitlines(keepends=True)[2:])
    monkeypatch.setattr(dmesg, "_read_kmsg", lambda: wrapped)
    monkeypatch.setattr(dmesg, "_read_dmesg_tool", lambda: "[    1.0] nothing here\n")
    with pytest.raises(HostUnavailable, match=r"none kept in this boot: /dev/kmsg: the oldest "
                                              r"record left is an 'x86/fpu:' line.*; dmesg: the "
                                              r"log holds no 'x86/fpu:' line"):
        dmesg.host_fpu_lines()
    assert not kept.exists()
    monkeypatch.setattr(dmesg, "_read_dmesg_tool", lambda: DMESG)
    assert dmesg.host_fpu_lines() == EXPECTED
    # The block and the later 'signal: max sigframe size' line are kept...
    assert kept.read_text().splitlines() == [*EXPECTED, "signal: max sigframe size: 3376"]
    # ...and answer later in the same boot, when the log has lost them.
    monkeypatch.setattr(dmesg, "_read_dmesg_tool", lambda: "[ 3081.4] bad frame\n")
    assert dmesg.host_fpu_lines() == EXPECTED
    assert "signal: max sigframe size: 3376" in dmesg.kept_boot_messages()

"""docs/kvm_example.py, which writes docs/kvm-example.md: the guest XSAVES output of the model,
what this machine's KVM does with the same program, and the KVM_GET_XSAVE2 comparison (model
and real vCPU, same guest state) that must be byte-identical. The KVM parts skip with the
reason where /dev/kvm is absent or unusable."""

from __future__ import annotations

import importlib.util
import struct
import sys
from pathlib import Path

import pytest

from fpstate.errors import HostUnavailable
from fpstate.kvm.x86.cpuid import XSAVES, find_cpuid
from fpstate.tools.blob import decode
from fpstate.x86.profiles import load_profile

_PATH = Path(__file__).resolve().parents[2] / "docs" / "kvm_example.py"
_spec = importlib.util.spec_from_file_location("kvm_example", _PATH)
ex = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = ex  # dataclasses look their module up while the class is built
_spec.loader.exec_module(ex)
SEED = 0x4B


@pytest.fixture(scope="module")
def ctx():
    from fpstate.kvm.x86.conform_host import Context

    try:
        c = Context()
    except HostUnavailable as e:
        pytest.skip(str(e))
    yield c
    c.close()


def test_the_models_guest_xsaves_output() -> None:
    """XSAVES with RFBM = XCR0 0xe7 | IA32_XSS CET_U: compacted, XCOMP_BV = bit 63 | 0x8e7,
    XSTATE_BV = XINUSE (x87 never touched), CET_U right after Hi16_ZMM (2432 on this CPU)
    holding what XRSTORS loaded."""
    buf = ex.model_guest_xsaves(SEED)
    assert struct.unpack_from("<QQ", buf, 512) == (0x8E6, 1 << 63 | 0x8E7)
    assert struct.unpack_from("<QQ", buf, 2432) == (ex.U_CET, ex.PL3_SSP)
    blob = decode(buf[:4096], load_profile("zen5"), "xsaves")
    assert blob.component(11).offset == 2432 and blob.component(11).state == "in use"
    assert blob.register("zmm16") != 0 and blob.register("k1") != 0


def test_compare_line_names_what_differs() -> None:
    host = load_profile("zen5")
    a = bytes(4096)
    assert ex.compare_line(a, a, host) == "identical: 4096 bytes"
    b = bytearray(a)
    b[24] = 1  # MXCSR
    b[1408 + 70] = 1  # Hi16_ZMM (component 7 at 1408)
    assert ex.compare_line(a, bytes(b), host) == \
        "differ: MXCSR (1 bytes from 24), component 7 (1 bytes from 1478)"


def _needs_avx512(ctx) -> None:
    if ctx.system.xcr0 & 0xE0 != 0xE0:
        pytest.skip(f"the example's guest programs set XCR0 0xe7 (AVX-512); this host's XCR0 "
                    f"is {ctx.system.xcr0:#x}")


@pytest.mark.host
def test_kvm_get_xsave2_of_model_and_real_vcpu_are_identical(ctx) -> None:
    """The README's part B: the same guest state gives the same 4096 bytes from the model of
    KVM and from this machine's KVM, and `fpstate decode kvm:SEED` reads those bytes too."""
    _needs_avx512(ctx)
    pair = ex.kvm_get_xsave2_pair(ctx, SEED)
    assert ex.compare_line(pair.model, pair.real, ctx.host) == f"identical: {len(pair.real)} bytes"
    assert pair.cli == pair.real
    assert struct.unpack_from("<Q", pair.real, 512)[0] == 0xE6  # x87 in its initial state


@pytest.mark.host
def test_the_guest_xsaves_attempts_on_this_kvm(ctx) -> None:
    """The README's part A, real side: where model and real are both answers (not KVM exits)
    they agree on the fault; on kvm_pvm guest CPL 0 ends in KVM's emulator."""
    _needs_avx512(ctx)
    attempts = ex.real_guest_xsaves(ctx, SEED)
    assert len(attempts) == 6
    cpl3, bare = attempts[4], attempts[5]
    d1 = find_cpuid(ctx.entries, 0xD, 1)
    expected = "#GP" if d1 and d1.eax & XSAVES else "#UD"  # SDM: #UD first, then CPL > 0
    assert cpl3.model.split(" ")[0] == cpl3.real.split(" ")[0] == expected
    assert bare.real.startswith("#GP at step 4")
    if ctx.backend == "kvm_pvm":
        assert "KVM_EXIT_INTERNAL_ERROR" in attempts[3].real and "xsaves64" in attempts[3].real
        assert attempts[1].model.endswith("(#GP)") and "#GP" in attempts[1].real

"""XSAVE images as the architecture reads them: the initial configuration behind XSTATE_BV.

Models the "initial configuration" of Intel SDM Vol. 1 section 13.6 ("Processor Tracking of
XSAVE-Managed State") and the way XRSTOR uses it (13.8.1, 13.8.2): a component whose
XSTATE_BV bit is clear is not *in* the image, it is "in its initial configuration", whatever
bytes happen to be at its offset. `normalise_image` writes those bytes, so that two images that
XRSTOR would load into the same registers compare equal byte for byte.

Rules of this file:
- the initial configuration of x87 state (13.6): FCW = 037FH, FSW = 0, FTW = FFFFH (all
  empty: the abridged tag byte 4 of the legacy region is 0), FOP = 0, FIP = FDP = 0 (and the
  selectors, which the 64-bit layout overlays on the pointers), ST0-ST7 = 0;
- SSE state in 64-bit mode: XMM0-XMM15 = 0. MXCSR is *not* governed by XSTATE_BV[1]: "XINUSE[1]
  pertains only to the state of the XMM registers and not to MXCSR" (13.9, XSAVEOPT) and the
  standard form of XRSTOR "loads MXCSR from the XSAVE area whenever either RFBM[1] or RFBM[2]
  is set" (13.8.2). Only the compacted form sets MXCSR to 1F80H when XSTATE_BV[1] = 0. So in a
  standard image MXCSR and MXCSR_MASK (bytes 24-31) are left exactly as written;
- every other component's initial configuration is all zeros (AVX, opmask, ZMM_Hi256,
  Hi16_ZMM, PKRU, TILECFG, TILEDATA, APX, the MPX components, CET);
- the header (XSTATE_BV, XCOMP_BV, reserved bytes) and the bytes that belong to no component
  (416-511 of the legacy region, padding between components) are never touched.
"""

from __future__ import annotations

import struct

from fpstate.errors import BlobError
from fpstate.x86.xfeatures import FIRST_EXTENDED_XFEATURE, XSAVE_HDR_OFFSET, XSAVE_HDR_SIZE, bits

#: x87 part of the legacy region (SDM 13.5.1, table 13-1): bytes 23:0 and 159:32.
X87_CONTROL = (0, 24)  #: FCW, FSW, FTW, FOP, FIP, FDP
X87_REGISTERS = (32, 160)  #: ST0-ST7, 16 bytes each (10 used, 6 reserved)
FCW_INIT = 0x037F
#: SSE part of the legacy region (SDM 13.5.2): MXCSR at 24, MXCSR_MASK at 28, XMM0-15 at 160.
MXCSR_OFFSET = 24
MXCSR_MASK_OFFSET = 28
XMM_OFFSET = 160
XMM_BYTES = 256


def x87_init_bytes() -> tuple[bytes, bytes]:
    """The initial configuration of x87 state as (bytes 0-23, bytes 32-159) of the legacy region."""
    control = struct.pack("<HHBBHQQ", FCW_INIT, 0, 0, 0, 0, 0, 0)
    return control, bytes(X87_REGISTERS[1] - X87_REGISTERS[0])


def normalise_image(image: bytes, xcr0: int, offsets: dict[int, tuple[int, int]]) -> bytes:
    """``image`` (standard format) with every XCR0 component whose XSTATE_BV bit is clear
    rewritten as its initial configuration (SDM 13.6), XSTATE_BV itself left as it is.

    ``offsets`` maps each extended component (number >= 2) to ``(offset, size)`` of the standard
    format, i.e. CPUID.(EAX=0DH,ECX=i):EBX and EAX. x87 and SSE live in the legacy region and
    need no entry. MXCSR and MXCSR_MASK are left as written (see the module docstring).
    """
    if len(image) < XSAVE_HDR_OFFSET + XSAVE_HDR_SIZE:
        raise BlobError(f"image is {len(image)} bytes; an XSAVE image has at least 576")
    xstate_bv = struct.unpack_from("<Q", image, XSAVE_HDR_OFFSET)[0]
    out = bytearray(image)
    for i in bits(xcr0 & ~xstate_bv):
        if i == 0:
            control, regs = x87_init_bytes()
            out[X87_CONTROL[0]:X87_CONTROL[1]] = control
            out[X87_REGISTERS[0]:X87_REGISTERS[1]] = regs
        elif i == 1:
            out[XMM_OFFSET:XMM_OFFSET + XMM_BYTES] = bytes(XMM_BYTES)
        else:
            assert i >= FIRST_EXTENDED_XFEATURE
            if i not in offsets:
                raise BlobError(f"component {i} is in XCR0 {xcr0:#x} but has no standard offset")
            offset, size = offsets[i]
            if offset < XSAVE_HDR_OFFSET + XSAVE_HDR_SIZE or offset + size > len(image):
                raise BlobError(
                    f"component {i} at {offset:#x}+{size:#x} lies outside the "
                    f"{len(image)}-byte image's extended region"
                )
            out[offset:offset + size] = bytes(size)
    return bytes(out)

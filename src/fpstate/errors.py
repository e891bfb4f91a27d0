"""Exceptions of the package.

Architectural faults (#GP, #UD, #NM) are *values* (`fpstate.x86.program.Fault`), never
exceptions. The exceptions here are for bad input and for host features that are absent;
the command line turns every `FpstateError` into one line on stderr and exit status 2.
"""

from __future__ import annotations


class FpstateError(Exception):
    """Base class: bad input or an unanswerable question. One line, no traceback, on the CLI."""


class ProfileError(FpstateError):
    """A CPUID dump or profile that is truncated, garbled, unknown or inconsistent."""


class MaskError(FpstateError):
    """A feature mask with bits the profile or the operation does not support."""


class ProgramError(FpstateError):
    """An instruction program that is malformed (unknown mnemonic, bad register, bad buffer)."""


class BlobError(FpstateError):
    """A state blob (XSAVE area, signal frame, regset, KVM buffer) that cannot be parsed."""


class HostUnavailable(FpstateError):
    """The real machine cannot answer: the CPU, kernel or /dev/kvm lacks the feature.

    The message names what is missing; host tests turn it into a skip with that reason.
    """

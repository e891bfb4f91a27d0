"""Session set-up shared by every test folder.

The kernel's ring buffer is small, and the signal and ptrace tests make the kernel print (a
bad rt_sigreturn frame prints one line each): read this boot's ``x86/fpu:`` lines before any
test runs, so fpstate.host.dmesg keeps them under the boot's boot_id for the boot-lines
differential tests that run later.
"""

from __future__ import annotations


def pytest_sessionstart(session) -> None:
    from fpstate.errors import FpstateError

    try:
        from fpstate.host.dmesg import host_fpu_lines

        host_fpu_lines()
    except FpstateError:
        pass  # the tests that need the lines skip with the reason

"""NT_X86_XSTATE from core files: a real core of a process that used AVX-512 (dumped by the kernel
and by gdb's gcore), and a constructed core of an AMX process on Sapphire Rapids whose note is
what the kernel model's xstateregs_get() writes (this host has no AMX)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.errors import BlobError, HostUnavailable
from fpstate.kernel.x86 import regset
from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.sched import Machine
from fpstate.tools.blob import decode
from fpstate.tools.corefile import build_core, xstate_notes
from fpstate.x86.profiles import bundled_profile

SEED = 0x77


def _path(fn):
    def path(c, *args):
        result = fn(c, *args)
        if False:  # pragma: no cover
            yield
        return result
    return path


# -- host cores -----------------------------------------------------------------------------------

def _avx512_host():
    from fpstate.host.child import register_class

    try:
        rc = register_class()
    except HostUnavailable as e:
        pytest.skip(str(e))
    if rc.vector_bytes != 64:
        pytest.skip(f"host XCR0 {rc.xcr0:#x} lacks AVX-512 (opmask|ZMM_Hi256|Hi16_ZMM = 0xe0)")
    return rc


def _pattern_child(shm_address: int, body_tail):
    from fpstate.host.child import Asm, CodePages, load_patterns

    pages = CodePages(1)
    a = Asm()
    load_patterns(a, shm_address)
    body_tail(a)
    pages.call(pages.place(0, a))
    return 6


def _kernel_core(tmp_path: Path, code) -> tuple[Path, object]:
    """Fork a child that raises its own RLIMIT_CORE (no system setting changes; core_pattern
    must write a file in its directory), runs the machine code ``code(asm)`` emits and kills
    itself with SIGQUIT: the core file the kernel wrote and the child's exit."""
    from fpstate.host.child import SYS, CodePages, Reg, fork_child, raw_syscall, wait_child
    from fpstate.host.child import Asm as HostAsm

    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write a file in the process's directory")
    try:
        hard = resource.getrlimit(resource.RLIMIT_CORE)[1]
    except OSError:
        hard = 0
    if hard == 0:
        pytest.skip("RLIMIT_CORE hard limit is 0: no process may dump core")

    def body() -> int:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,
                                                  resource.RLIM_INFINITY))
        raw_syscall(SYS["prctl"], 4, 1)  # PR_SET_DUMPABLE 1 (fork_child cleared it)
        os.chdir(tmp_path)
        act = (ctypes.c_uint64 * 4)(0, 0, 0, 0)  # SIG_DFL: dump core
        raw_syscall(SYS["rt_sigaction"], signal.SIGQUIT, ctypes.addressof(act), 0, 8)
        pages = CodePages(1)
        a = HostAsm()
        code(a)
        a.syscall(SYS["getpid"])
        a.syscall(SYS["kill"], Reg(a.R.RAX), signal.SIGQUIT)
        a.exit_group(7)
        pages.call(pages.place(0, a))
        return 6

    ex = wait_child(fork_child(body))
    assert ex.signal == signal.SIGQUIT, ex
    cores = [p for p in tmp_path.iterdir() if p.name.startswith(pattern.split("%")[0] or "core")]
    if not cores:
        pytest.skip(f"no core file appeared (core_pattern {pattern!r})")
    return cores[0], ex


@pytest.mark.host
def test_kernel_core_dump_of_an_avx512_process(tmp_path: Path) -> None:
    """The child loads every register with a pattern in machine code and dumps core: the
    kernel's core has the zmm/k values it set."""
    from fpstate.host.child import (
        SharedMemory,
        load_patterns,
        opmask_pattern,
        pattern_table,
        zmm_pattern,
    )
    from fpstate.x86.profiles import load_profile

    _avx512_host()
    shm = SharedMemory(4096)
    shm.write(0, pattern_table(SEED))
    core, ex = _kernel_core(tmp_path, lambda a: load_patterns(a, shm.address))
    notes = xstate_notes(core.read_bytes())
    assert len(notes) == 1 and notes[0].tid == ex.pid
    blob = decode(notes[0].data, load_profile("host"))
    assert blob.fmt == "uabi" and blob.warnings == ()
    assert blob.xstate_bv & 0xE6 == 0xE6
    for n in (0, 5, 16, 31):
        z = int.from_bytes(zmm_pattern(n, SEED), "little")
        if n < 16:
            got = (blob.register(f"zmm_h{n}") << 256 | blob.register(f"ymmh{n}") << 128
                   | blob.register(f"xmm{n}"))
        else:
            got = blob.register(f"zmm{n}")
        assert got == z
    assert blob.register("k7") == opmask_pattern(7, SEED)
    assert blob.register("mxcsr") == 0xFFC0


@pytest.mark.host
def test_kernel_core_dump_of_an_amx_process(tmp_path: Path) -> None:
    """On an AMX host: ARCH_REQ_XCOMP_PERM(XTILE_DATA), LDTILECFG, TILELOADD of all eight
    tiles, then a core dump. The note is fpu_user_cfg.max_size bytes with TILECFG/TILEDATA in
    XSTATE_BV, and decoding it gives back the configuration and every tile row loaded."""
    from fpstate.host.amx import (
        COLSB,
        ROWS,
        TILE_BYTES,
        amx_unavailable,
        emit_tiles,
        tile_config,
        tile_data,
    )
    from fpstate.host.child import PAGE, SharedMemory
    from fpstate.x86.layout import standard_size
    from fpstate.x86.profiles import load_profile

    why = amx_unavailable()
    if why:
        pytest.skip(why)
    shm = SharedMemory(PAGE + len(tile_data()))
    shm.write(0, tile_config())
    shm.write(PAGE, tile_data())
    core, ex = _kernel_core(tmp_path, lambda a: emit_tiles(a, shm.address, shm.address + PAGE,
                                                           load=True, release=False))
    notes = xstate_notes(core.read_bytes())
    host = load_profile("host")
    blob = decode(notes[0].data, host)
    assert notes[0].tid == ex.pid and blob.fmt == "uabi" and blob.warnings == ()
    assert blob.xstate_bv & 0x60000 == 0x60000
    assert len(notes[0].data) == standard_size(host, blob.xcr0)
    assert blob.register("palette") == 1
    assert blob.register("colsb0") == COLSB and blob.register("rows7") == ROWS
    tiles = tile_data()
    for tile in range(8):
        for row in (0, ROWS - 1):
            at = tile * TILE_BYTES + row * COLSB
            assert blob.register(f"tmm{tile}_r{row}") == int.from_bytes(tiles[at:at + COLSB],
                                                                         "little")


@pytest.mark.host
def test_gdb_gcore_of_an_avx512_process(tmp_path: Path) -> None:
    """gdb -p PID -batch -ex generate-core-file: the note has the registers; gdb 13 sizes it
    by Intel's layout (2688 for XCR0 0xe7) on this AMD host, which decode flags."""
    from fpstate.host.child import SharedMemory, fork_child, pattern_table, zmm_pattern
    from fpstate.x86.profiles import load_profile

    _avx512_host()
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed")
    shm = SharedMemory(4096)
    shm.write(0, pattern_table(SEED))

    def tail(a) -> None:
        a.mov_imm(a.R.RAX, 1)
        a.store_rax(shm.address + 4000)
        a.label("again")
        a.syscall(34)  # pause
        a.jump("JMP_REL32_64", "again")

    pid = fork_child(lambda: _pattern_child(shm.address, tail))
    try:
        deadline = time.monotonic() + 20
        while shm.u64(4000) != 1:
            assert time.monotonic() < deadline, "child never loaded its registers"
            time.sleep(0.005)
        out = tmp_path / "gcore"
        subprocess.run([gdb, "-nx", "-batch", "-p", str(pid), "-ex",
                        f"generate-core-file {out}"], capture_output=True, timeout=120,
                       check=False)
        if not out.exists():
            pytest.skip("gdb could not attach (ptrace permissions)")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    notes = xstate_notes(out.read_bytes())
    host = load_profile("host")
    blob = decode(notes[0].data, host)
    assert blob.register("zmm17") == int.from_bytes(zmm_pattern(17, SEED), "little")
    expected = blob.xcr0 is not None and len(notes[0].data)
    from fpstate.x86.layout import standard_size

    if expected != standard_size(host, blob.xcr0):
        assert any("fpu_user_cfg.max_size" in w for w in blob.warnings)


# -- a constructed AMX core -----------------------------------------------------------------------

def test_constructed_sapphire_rapids_core_with_amx_tiles() -> None:
    """An SPR task with AMX permission writes TILECFG and TILEDATA (the first use grows its
    buffer through XFD #NM); the kernel model's xstateregs_get() -- the regset get that
    fill_thread_core_info() calls -- gives the note; decoding the core finds the tiles."""
    spr = bundled_profile("sapphire-rapids")
    m = Machine.boot(spr, ncpus=1)
    t = m.spawn("amx")
    m.run(0, t)
    assert m.syscall(0, xp.sys_arch_prctl, xp.ARCH_REQ_XCOMP_PERM, 18) == 0
    cfg = bytearray(64)
    cfg[0] = 1  # palette 1
    for n in range(8):
        cfg[16 + 2 * n:18 + 2 * n] = (64).to_bytes(2, "little")
        cfg[48 + n] = 16
    tiles = bytes((7 * k + 3) & 0xFF for k in range(8192))
    m.user_write(0, 17, bytes(cfg))
    m.user_write(0, 18, tiles)
    size = regset.regset_xstate_size(m.system)
    note = m.syscall(0, _path(regset.xstateregs_get), t, size)
    assert len(note) == 11008
    core = build_core([(t.pid, note)])
    blob = decode(xstate_notes(core)[0].data, spr)
    assert blob.fmt == "uabi" and blob.xcr0 == 0x602E7 and blob.warnings == ()
    assert blob.component(18).offset == 0xB00 and blob.component(18).state == "in use"
    assert blob.register("palette") == 1 and blob.register("rows7") == 16
    for tile, row in ((0, 0), (5, 9), (7, 15)):
        at = tile * 1024 + row * 64
        assert blob.register(f"tmm{tile}_r{row}") == int.from_bytes(tiles[at:at + 64], "little")


def test_core_errors_are_blob_errors(tmp_path: Path) -> None:
    with pytest.raises(BlobError, match="not a readable ELF core"):
        xstate_notes(b"\x7fELF" + bytes(10))
    with pytest.raises(BlobError, match="no NT_X86_XSTATE"):
        xstate_notes(build_core([])[:120])
    exe = Path("/bin/true").read_bytes()
    with pytest.raises(BlobError, match="not a core file"):
        xstate_notes(exe)


@settings(max_examples=150, deadline=None)
@given(tail=st.binary(max_size=600), cut=st.integers(0, 2000))
def test_corrupt_cores_raise_only_blob_error(tail: bytes, cut: int) -> None:
    """Random ELF-looking bytes, and a real constructed core cut short or with garbage
    appended: BlobError or notes, nothing else."""
    good = build_core([(1, bytes(2432))])
    for data in (b"\x7fELF" + tail, good[:cut], good[:64] + tail, good + tail):
        try:
            xstate_notes(data)
        except BlobError:
            pass


@pytest.mark.host
def test_kernel_core_dump_of_a_32_bit_process(tmp_path: Path) -> None:
    """A 32-bit program loads an x87/SSE state and stops; SIGQUIT then SIGCONT make the kernel
    dump it. The core is ELFCLASS32: its NT_PRSTATUS is the compat one (pr_pid at 24), and
    xstate_notes names the thread by it; its NT_PRFPREG is the ia32 view's
    user_i387_ia32_struct, which the kernel model's convert_from_fxsr() makes from the
    NT_X86_XSTATE note's legacy area, byte for byte."""
    from elftools.elf.elffile import ELFFile

    from fpstate.host.ia32_ptrace import stopping_program
    from fpstate.kernel.x86.conform_signal import ia32_probe_state
    from fpstate.kernel.x86.regset import convert_from_fxsr

    pattern = Path("/proc/sys/kernel/core_pattern").read_text().strip()
    if pattern.startswith("|") or "/" in pattern:
        pytest.skip(f"core_pattern {pattern!r} does not write a file in the process's directory")
    if resource.getrlimit(resource.RLIMIT_CORE)[1] == 0:
        pytest.skip("RLIMIT_CORE hard limit is 0: no process may dump core")
    image = ia32_probe_state()
    try:
        elf = stopping_program(image)
    except HostUnavailable as e:
        pytest.skip(str(e))
    prog = tmp_path / "probe32"
    prog.write_bytes(elf)
    prog.chmod(0o700)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2)
            os.chdir(tmp_path)
            os.execv(str(prog), [str(prog)])
        finally:
            os._exit(127)
    _, status = os.waitpid(pid, os.WUNTRACED)
    if not os.WIFSTOPPED(status):
        pytest.skip(f"the 32-bit program did not run (wait status {status:#x}): no ia32")
    os.kill(pid, signal.SIGQUIT)
    os.kill(pid, signal.SIGCONT)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGQUIT
    cores = [p for p in tmp_path.iterdir() if p.name.startswith(pattern.split("%")[0] or "core")]
    if not cores:
        pytest.skip(f"no core file appeared (core_pattern {pattern!r})")
    data = cores[0].read_bytes()
    (note,) = xstate_notes(data)
    assert note.tid == pid
    fx = note.data[:512]
    assert fx[32:42] == image[32:42]  # ST0 as the program loaded it
    notes = {}
    with open(cores[0], "rb") as f:
        core = ELFFile(f)
        assert core.elfclass == 32 and core.header["e_machine"] == "EM_386"
        for seg in core.iter_segments():
            if seg.header["p_type"] == "PT_NOTE":
                for n in seg.iter_notes():
                    notes.setdefault(n["n_type"], bytes(n["n_descdata"]))
    prfpreg = notes.get("NT_FPREGSET", notes.get(2))
    assert prfpreg is not None and len(prfpreg) == 108
    assert prfpreg == convert_from_fxsr(fx)


@pytest.mark.host
def test_kernel_core_dump_shows_a_stale_mxcsr(tmp_path: Path) -> None:
    """A core dump's NT_X86_XSTATE note comes from xstateregs_get() too (kernel-findings 6).
    The child loads MXCSR 0xffc0 and sleeps (the switch-out's XSAVES saves SSE, MXCSR with
    it), then loads 1F80H, restores AVX state alone (SSE initial) and dumps core: the dump's
    XSAVES leaves MXCSR's bytes alone, and the note shows 0xffc0 beside a header with YMM and
    without SSE -- as the model's __copy_xstate_to_uabi_buf() gives for that fpstate -- while
    the task's MXCSR was 1F80H."""
    import struct

    from fpstate.host.child import SYS, SharedMemory, avx_alone_image
    from fpstate.host.child import register_class as host_rc
    from fpstate.kernel.x86.regset import XSTATE_COPY_XSAVE, __copy_xstate_to_uabi_buf

    try:
        if host_rc().vector_bytes < 32:
            pytest.skip("host lacks AVX (XCR0[2] = 0)")
    except HostUnavailable as e:
        pytest.skip(str(e))
    m = Machine.boot("host")
    if not m.system.xsaves:
        pytest.skip("the kernel saves tasks with XSAVEC or standard XSAVE, not XSAVES")
    shm = SharedMemory(3 * 4096)
    shm.write(0, struct.pack("<II", 0xFFC0, 0x1F80) + struct.pack("<qq", 0, 2_000_000))
    shm.write(4096, avx_alone_image())

    def code(a) -> None:
        C, In, M, R = a.C, a.In, a.M, a.R
        a.mov_imm(R.RBX, shm.address)
        a.emit(In.create_mem(C.LDMXCSR_M32, M(R.RBX)))
        a.syscall(SYS["nanosleep"], shm.address + 8, 0)  # 2 ms asleep: switched out
        a.mov_imm(R.RBX, shm.address)
        a.emit(In.create_mem(C.LDMXCSR_M32, M(R.RBX, displ=4)))
        a.mov_imm(R.RAX, 0x6)
        a.mov_imm(R.RDX, 0)
        a.emit(In.create_mem(C.XRSTOR64_MEM, M(R.RBX, displ=4096)))

    for attempt in range(8):  # this machine, a guest itself, now and then keeps SSE in use
        run = tmp_path / str(attempt)
        run.mkdir()
        core, _ex = _kernel_core(run, code)
        note = xstate_notes(core.read_bytes())[0].data
        bv = struct.unpack_from("<Q", note, 512)[0]
        if not bv & 0x2:
            break
    else:
        pytest.skip("SSE was in use at every dump of 8 (the CPU keeps marking it in use)")
    assert bv & 0x6 == 0x4
    assert struct.unpack_from("<I", note, 24)[0] == 0xFFC0
    fps = m.spawn("dumper").fpu.fpstate
    fps.regs[24:32] = struct.pack("<II", 0xFFC0, m.system.mxcsr_feature_mask)
    fps.xstate_bv = bv & fps.user_xfeatures
    view = __copy_xstate_to_uabi_buf(m.system, bytes(m.init_fpstate.regs), fps,
                                     fps.user_xfeatures, 0, XSTATE_COPY_XSAVE, len(note))
    assert view[24:28] == note[24:28]

"""NT_X86_XSTATE from core files: a real core of a process that used AVX-512 (dumped by the kernel
and by gdb's gcore), and a constructed core of an AMX process on Sapphire Rapids whose note is
what the kernel model's xstateregs_get() writes (this host has no AMX)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile
from hypothesis import given, settings
from hypothesis import strategies as st

from fpstate.cli import main
from fpstate.commands.decode import _decode
from fpstate.errors import BlobError, HostUnavailable
from fpstate.kernel.x86 import regset, xstate
from fpstate.kernel.x86 import xstate_prctl as xp
from fpstate.kernel.x86.sched import Machine
from fpstate.kernel.x86.versions import version_for_release
from fpstate.tools.blob import decode, supported_mxcsr_mask
from fpstate.tools.corefile import (
    LayoutNote,
    XfeatComponent,
    build_core,
    layout_disagreements,
    layout_problems,
    profile_from_layout,
    xsave_layout_note,
    xstate_notes,
)
from fpstate.tools.record import StateRecord
from fpstate.tools.sources import Source, read_source
from fpstate.x86.profiles import bundled_profile, load_profile

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
    """`fpstate.host.coredump.kernel_core`, skipping where this machine writes no core file."""
    from fpstate.host.coredump import kernel_core

    try:
        core = kernel_core(tmp_path, code)
    except HostUnavailable as e:
        pytest.skip(str(e))
    assert core.exit.signal == signal.SIGQUIT, core.exit
    return core.path, core.exit


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


# -- NT_X86_XSAVE_LAYOUT (Linux 6.12+) -------------------------------------------------------------

def _layout_core(cpu: str) -> bytes:
    """A core of a task on ``cpu`` (the kernel model) whose AVX, opmask and ZMM registers hold
    patterns, with the NT_X86_XSAVE_LAYOUT note the model's 6.18 writes after its notes."""
    prof = bundled_profile(cpu)
    m = Machine.boot(prof, ncpus=1)
    t = m.spawn("avx512")
    m.run(0, t)
    for i, size in ((2, 256), (5, 64), (6, 512), (7, 1024)):
        m.user_write(0, i, bytes((i * 37 + 11 * k) & 0xFF for k in range(size)))
    note = m.syscall(0, _path(regset.xstateregs_get), t, regset.regset_xstate_size(m.system))
    extra = xstate.elf_coredump_extra_notes(xstate.fpu__init_system_xstate(prof, "6.18"))
    return build_core([(t.pid, note)], extra_notes=extra.data)


def _sources_of(core: bytes, tmp_path: Path) -> list[Source]:
    """read_source() of ``core`` written to a file, as `fpstate decode` reads it."""
    path = tmp_path / "core"
    path.write_bytes(core)
    return read_source(str(path))


def test_core_decodes_with_its_own_layout_note(tmp_path: Path) -> None:
    """A Zen 4 core (AVX-512 right after AVX: opmask at 832) decodes without being told the
    CPU; decoding it as Sapphire Rapids (opmask at 1088) reads other bytes, and says why."""
    (src,) = _sources_of(_layout_core("zen4"), tmp_path)
    assert src.layout is not None and src.layout.features == 0x2E4
    own = _decode(src, None, "auto", None)
    assert own.profile == "core (NT_X86_XSAVE_LAYOUT)" and own.warnings == ()
    assert own.component(5).offset == 832 and own.component(7).offset == 1408
    assert own.register("k0") == int.from_bytes(bytes((5 * 37 + 11 * k) & 0xFF
                                                      for k in range(8)), "little")
    zen = decode(src.data, bundled_profile("zen4"))
    assert [(c.number, c.offset, c.registers) for c in own.components] == \
        [(c.number, c.offset, c.registers) for c in zen.components]
    wrong = _decode(src, "sapphire-rapids", "auto", None)
    assert wrong.register("k0") != own.register("k0")
    said = [w for w in wrong.warnings if "NT_X86_XSAVE_LAYOUT says otherwise" in w]
    assert "xfeature 5 (opmask) is at 0x340+0x40 in the core, at 0x440+0x40 on " \
        "sapphire-rapids" in said[0]
    assert len(said) == 4  # opmask, ZMM_Hi256, Hi16_ZMM and PKRU all moved


def test_layout_note_of_a_core_without_one_and_of_two() -> None:
    assert xsave_layout_note(build_core([(1, bytes(832))])) is None
    extra = xstate.elf_coredump_extra_notes(
        xstate.fpu__init_system_xstate(bundled_profile("haswell"), "6.18")).data
    with pytest.raises(BlobError, match="2 NT_X86_XSAVE_LAYOUT notes"):
        xsave_layout_note(build_core([(1, bytes(832))], extra_notes=extra + extra))
    bad = extra[:4] + (17).to_bytes(4, "little") + extra[8:] + bytes(4)
    with pytest.raises(BlobError, match="17 bytes, not a multiple of 16"):
        xsave_layout_note(build_core([(1, bytes(832))], extra_notes=bad[:37]))


def _note(*records: tuple[int, int, int] | tuple[int, int, int, int]) -> LayoutNote:
    return LayoutNote(tuple(XfeatComponent(*r) for r in records), 0x100)


@pytest.mark.parametrize(("records", "xcr0", "size", "problem"), [
    (((1, 256, 160),), None, None, "extended features (2 to 63) only"),
    (((2, 256, 576), (2, 256, 576)), None, None, "xfeature 2 (avx) is listed twice"),
    (((5, 64, 1088), (2, 256, 576)), None, None, "follows xfeature 5"),
    (((2, 256, 576, 1),), None, None, "flags 0x1; the field is reserved"),
    (((2, 0, 0),), None, None, "xfeature 2 (avx) has size 0"),
    (((2, 256, 0),), None, None, "overlaps the legacy region"),
    (((2, 256, 576), (5, 64, 800)), None, None, "xfeature 2 (avx) at 0x240+0x100 overlaps "
                                                "xfeature 5 (opmask)"),
    (((2, 1024, 576), (5, 64, 1088), (6, 64, 1400)), None, None,
     "xfeature 2 (avx) at 0x240+0x400 overlaps xfeature 6 (zmm_hi256) at 0x578"),
    (((2, 256, 0xFFFFFF80),), None, None, "runs past 4 GiB"),
    (((2, 256, 576),), None, 800, "runs past the 800-byte NT_X86_XSTATE note"),
    (((2, 256, 576),), 0xE7, None, "XCR0 bits 5, 6, 7 have no record"),
    (((2, 256, 576), (9, 8, 2688)), 0x7, None, "records for 9 are not in XCR0"),
    (((2, 256, 576),), -1, None, "XCR0 -0x1 is not a 64-bit value"),
    (((2, 256, 576),), 1 << 64, None, "is not a 64-bit value"),
])
def test_layout_problems(records, xcr0, size, problem: str) -> None:
    found = layout_problems(_note(*records), xcr0, size)
    assert any(problem in p for p in found), found
    with pytest.raises(BlobError):
        profile_from_layout(_note(*records), xcr0 if xcr0 is not None else 0x7,
                            xstate_size=size)


def test_layout_problems_none_for_the_kernels_notes() -> None:
    for cpu in ("sapphire-rapids", "zen4", "haswell", "skylake-sp"):
        r = xstate.fpu__init_system_xstate(bundled_profile(cpu), "6.18")
        extra = xstate.elf_coredump_extra_notes(r)
        note = LayoutNote(extra.records, 0)
        assert layout_problems(note, r.fpu_user_cfg.max_features, r.fpu_user_cfg.max_size) == ()
        prof = profile_from_layout(note, r.fpu_user_cfg.max_features)
        assert layout_disagreements(note, bundled_profile(cpu)) == ()
        assert prof.xcr0_supported == r.fpu_user_cfg.max_features
        assert prof.cpuid(0xD, 0)[1] == r.fpu_user_cfg.max_size  # the standard size


def test_profile_from_layout_keeps_amds_misaligned_sse_mask() -> None:
    note = _note((2, 256, 576))
    assert supported_mxcsr_mask(profile_from_layout(note, 0x7, mxcsr_mask=0x2FFFF)) == 0x2FFFF
    assert supported_mxcsr_mask(profile_from_layout(note, 0x7)) == 0xFFFF


@settings(max_examples=200, deadline=None)
@given(desc=st.binary(max_size=200), xcr0=st.integers(0, 2**64 - 1),
       size=st.none() | st.integers(0, 20000))
def test_layout_note_readers_raise_only_blob_error(desc: bytes, xcr0: int, size) -> None:
    """Any descriptor in a note of type 0x205: the reader, the problem list and the profile
    answer or raise BlobError; a profile is made only from a note without problems."""
    name = b"LINUX\0\0\0"
    extra = (6).to_bytes(4, "little") + len(desc).to_bytes(4, "little") \
        + (0x205).to_bytes(4, "little") + name + desc + bytes(-len(desc) % 4)
    try:
        note = xsave_layout_note(build_core([(1, bytes(832))], extra_notes=extra))
    except BlobError:
        assert len(desc) % 16
        return
    assert note is not None and len(note.records) == len(desc) // 16
    problems = layout_problems(note, xcr0, size)
    assert all(isinstance(p, str) and "\n" not in p for p in problems)
    try:
        prof = profile_from_layout(note, xcr0)
    except BlobError:
        assert layout_problems(note, xcr0)
        return
    for r in note.records:
        assert prof.cpuid(0xD, r.type)[:2] == (r.size, r.offset)


def test_decode_cli_with_a_bad_layout_note(tmp_path: Path, capsys) -> None:
    """A core whose layout note lists AVX at 0: exit 2 with one line that says so and how to
    decode anyway; with --cpu it decodes and warns."""
    bad = _note((2, 256, 0))
    desc = b"".join(r.pack() for r in bad.records)
    extra = (6).to_bytes(4, "little") + (16).to_bytes(4, "little") \
        + (0x205).to_bytes(4, "little") + b"LINUX\0\0\0" + desc
    path = tmp_path / "core"
    path.write_bytes(build_core([(1, bytes(832))], extra_notes=extra))
    assert main(["decode", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "overlaps the legacy region" in err and "--cpu" in err
    assert main(["decode", str(path), "--cpu", "haswell"]) == 0
    assert "NT_X86_XSAVE_LAYOUT says otherwise: xfeature 2 (avx) is at 0x0+0x100 in the " \
        "core, at 0x240+0x100 on haswell" in capsys.readouterr().out


@pytest.mark.host
def test_kernel_core_dump_ends_with_the_layout_note_the_model_writes(tmp_path: Path) -> None:
    """The running kernel's core of a plain child: what follows the thread's notes is, byte
    for byte, elf_coredump_extra_notes() of the model booted on this CPU as this kernel's
    version (nothing before 6.12), it closes the PT_NOTE segment, and the core then decodes
    with its own layout as with the host's profile."""
    core, _ = _kernel_core(tmp_path, lambda a: None)
    data = core.read_bytes()
    host = load_profile("host")
    release = os.uname().release
    model = xstate.elf_coredump_extra_notes(
        xstate.fpu__init_system_xstate(host, version_for_release(release)))
    (seg,) = [s for s in ELFFile(io.BytesIO(data)).iter_segments()
              if s.header["p_type"] == "PT_NOTE"]
    end = seg.header["p_offset"] + seg.header["p_filesz"]
    (last,) = xstate_notes(data)
    assert model.size, f"kernel {release}: the model writes no layout note before 6.12"
    note = xsave_layout_note(data)
    assert note is not None
    assert data[note.offset:note.offset + model.size] == model.data
    assert note.offset + model.size == end
    assert note.offset > last.offset
    (src,) = _sources_of(data, tmp_path)
    own, hosts = _decode(src, None, "auto", None), decode(src.data, host)
    assert own.warnings == hosts.warnings
    assert [(c.number, c.offset, c.registers) for c in own.components] == \
        [(c.number, c.offset, c.registers) for c in hosts.components]


def test_record_of_a_core_takes_its_layout_and_translates(tmp_path: Path) -> None:
    """`fpstate record` of a Zen 4 core with its layout note keeps the note's leaf 0xD (opmask
    at 832); translating it to Sapphire Rapids puts the same k0 at 1088."""
    (tmp_path / "core").write_bytes(_layout_core("zen4"))
    assert main(["record", str(tmp_path / "core"), "-o", str(tmp_path / "r.json")]) == 0
    rec = StateRecord.from_json((tmp_path / "r.json").read_bytes())
    assert rec.cpu == "core (NT_X86_XSAVE_LAYOUT)" and rec.vendor == "unknown"
    assert dict(((leaf, sub), regs) for leaf, sub, regs in rec.leaves)[(0xD, 5)][:2] == (64, 832)
    assert main(["translate", str(tmp_path / "r.json"), "--to", "sapphire-rapids",
                 "-o", str(tmp_path / "spr.json")]) == 0
    spr = StateRecord.from_json((tmp_path / "spr.json").read_bytes())
    k0 = bytes((5 * 37 + 11 * k) & 0xFF for k in range(8))
    assert rec.state[832:840] == k0 and spr.state[1088:1096] == k0


def test_validate_notes_where_the_cpu_disagrees_with_the_core(tmp_path: Path, capsys) -> None:
    """validate boots the kernel model on --cpu (a layout note is no CPU to boot): a Zen 4
    core validated for Sapphire Rapids says, as notes and in the JSON, where SPR puts what
    the core holds elsewhere; validated for Zen 4 it says nothing of the kind."""
    (tmp_path / "core").write_bytes(_layout_core("zen4"))
    core = str(tmp_path / "core")
    main(["validate", core, "--as", "ptrace", "--cpu", "sapphire-rapids"])
    out = capsys.readouterr().out
    assert "  note: the core's NT_X86_XSAVE_LAYOUT says otherwise: xfeature 9 (pkru) is at " \
        "0x980+0x8 in the core, at 0xa80+0x8 on sapphire-rapids" in out
    main(["validate", core, "--as", "ptrace", "--cpu", "sapphire-rapids", "--json"])
    assert len(json.loads(capsys.readouterr().out)["layout_disagreements"]) == 4
    assert main(["validate", core, "--as", "ptrace", "--cpu", "zen4"]) == 0
    assert "NT_X86_XSAVE_LAYOUT" not in capsys.readouterr().out


def test_encode_of_a_core_decoded_by_its_layout_needs_no_cpu(tmp_path: Path, capsys) -> None:
    """decode --json of a Zen 4 core by its layout note, then encode without --cpu: the bytes
    of the core's NT_X86_XSTATE again, on any machine (the JSON's offsets rebuild the layout).
    A JSON whose components no longer fit that layout is refused in one line."""
    core = _layout_core("zen4")
    (tmp_path / "core").write_bytes(core)
    assert main(["decode", str(tmp_path / "core"), "--json"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "z.json").write_text(text)
    assert main(["encode", str(tmp_path / "z.json"), "-o", str(tmp_path / "z.bin")]) == 0
    assert (tmp_path / "z.bin").read_bytes() == xstate_notes(core)[0].data
    obj = json.loads(text)
    obj["components"][3]["offset"] = 600  # opmask over AVX
    (tmp_path / "bad.json").write_text(json.dumps(obj))
    assert main(["encode", str(tmp_path / "bad.json"), "-o", str(tmp_path / "b.bin")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "overlaps xfeature 5 (opmask)" in err


@pytest.mark.host
def test_kernel_core_dump_shows_thread_pkru_not_the_live_one(tmp_path: Path) -> None:
    """kernel-findings 9i where the host has protection keys (this one has none: skipped):
    a child's machine code reads PKRU, writes another value (key 1 closed too, key 0 left
    open) and at once kills itself with SIGQUIT; the core's PKRU is thread.pkru, the value of
    its last context switch -- the one it read -- not the one it crashed with. A preemption
    between the WRPKRU and the dump would refresh thread.pkru, so up to 8 children dump and
    one must show the old value; no core may show anything else."""
    from fpstate.host.child import SharedMemory
    from fpstate.kernel.x86.conform import host_pku_reason

    why = host_pku_reason()
    if why:
        pytest.skip(why)
    at = load_profile("host").component(9).offset
    shm = SharedMemory(4096)
    seen: list[tuple[int, int]] = []
    for k in range(8):
        run = tmp_path / f"run{k}"
        run.mkdir()

        def code(a) -> None:
            a.rdpkru()
            a.store_rax(shm.address)
            a.wrpkru(0x5555555C)

        core, _ = _kernel_core(run, code)
        (note,) = xstate_notes(core.read_bytes())
        before = shm.u64(0) & 0xFFFFFFFF
        seen.append((before, int.from_bytes(note.data[at:at + 4], "little")))
        if seen[-1][1] == before != 0x5555555C:
            break
    assert all(got in (before, 0x5555555C) for before, got in seen), seen
    assert seen[-1][1] == seen[-1][0] != 0x5555555C, seen


@settings(max_examples=150, deadline=None)
@given(comps=st.lists(st.fixed_dictionaries({
    "number": st.one_of(st.integers(-3, 70), st.text(max_size=3), st.none()),
    "size": st.one_of(st.integers(-5, 1 << 33), st.text(max_size=3)),
    "offset": st.one_of(st.integers(-5, 1 << 33), st.none())}), max_size=6),
    xcr0=st.one_of(st.integers(-2, 1 << 65).map(hex), st.text(max_size=6), st.integers()))
def test_encode_layout_of_any_json_raises_only_blob_error(comps, xcr0) -> None:
    """The layout encode rebuilds from a core JSON a user may have edited: any components
    and XCR0 give a profile or BlobError."""
    from fpstate.commands.decode import _encode_profile
    from fpstate.tools.corefile import LAYOUT_PROFILE

    obj = {"cpu": LAYOUT_PROFILE, "xcr0": xcr0, "components": comps}
    try:
        _encode_profile(None, obj, json.dumps(obj))
    except BlobError:
        pass


def _gdb_values(gdb: str, core: Path, exprs: list[str]) -> list[str]:
    """What gdb prints for each of ``exprs`` (``p/x``) reading ``core`` without its program."""
    args = [gdb, "-nx", "-batch", "-c", str(core)]
    for e in exprs:
        args += ["-ex", f"p/x {e}"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120).stdout
    return [line.split(" = ", 1)[1].strip() for line in out.splitlines()
            if line.startswith("$") and " = " in line]


@pytest.mark.host
def test_gdb_reads_a_kernel_core_as_decode_does(tmp_path: Path) -> None:
    """An independent decoder on the same real core: gdb, given only the core this kernel
    dumped of a pattern child, prints ZMM0-31, k0-7 and MXCSR; `decode` of the core's
    NT_X86_XSTATE by its own layout note gives the same values. gdb 13 lays NT_X86_XSTATE out
    from XCR0 and the note's size as Intel does, so hosts with another layout are skipped."""
    from fpstate.host.child import SharedMemory, load_patterns, pattern_table

    _avx512_host()
    gdb = shutil.which("gdb")
    if gdb is None:
        pytest.skip("gdb is not installed")
    host = load_profile("host")
    if host.component(5).offset != 1088:
        pytest.skip(f"opmask at {host.component(5).offset} here; gdb 13 reads cores in "
                    "Intel's layout (opmask at 1088) only")
    shm = SharedMemory(4096)
    shm.write(0, pattern_table(SEED))
    core, _ = _kernel_core(tmp_path, lambda a: load_patterns(a, shm.address))
    (src,) = _sources_of(core.read_bytes(), tmp_path)
    blob = _decode(src, None, "auto", None)
    exprs = ([f"$zmm{n}.v8_int64" for n in range(32)] + [f"$k{n}" for n in range(8)]
             + ["$mxcsr"])
    got = _gdb_values(gdb, core, exprs)
    if len(got) != len(exprs):
        pytest.skip(f"gdb printed {len(got)} of {len(exprs)} values reading the core")

    def zmm(n: int) -> int:
        if n >= 16:
            return blob.register(f"zmm{n}")
        return (blob.register(f"zmm_h{n}") << 256 | blob.register(f"ymmh{n}") << 128
                | blob.register(f"xmm{n}"))

    for n in range(32):
        lanes = [int(x, 16) for x in got[n].strip("{}").split(",")]
        assert sum(q << (64 * i) for i, q in enumerate(lanes)) == zmm(n), f"zmm{n}"
    for n in range(8):
        assert int(got[32 + n], 16) == blob.register(f"k{n}"), f"k{n}"
    assert int(got[40], 16) == blob.register("mxcsr") == 0xFFC0

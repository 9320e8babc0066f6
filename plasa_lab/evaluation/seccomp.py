"""The system calls of a process that runs block code (bwrap --seccomp reads the program): threads
but no new process, and no kernel object shared with another process. A filter, in classic BPF,
built here from the kernel's syscall numbers; evaluation.sandbox applies it.
"""

import errno
import platform
import struct

# Per machine: (audit arch, clone, clone3, fork-like calls, fcntl, calls refused outright). Numbers
# from the kernel's ABI (x86_64: asm/unistd_64.h; aarch64: asm-generic/unistd.h). Refused outright:
# flock; SysV shared memory, semaphores and messages; POSIX message queues; inotify and fanotify
# (events on files another sandbox opens); mincore (which pages another process brought into the
# page cache); perf events; keyrings; userfaultfd; io_uring (its requests pass no seccomp filter);
# bpf; ptrace and the cross-process memory and comparison calls.
_SYSCALLS = {
    "x86_64": dict(
        arch=0xC000003E,
        clone=56,
        clone3=435,
        forks=(57, 58),
        fcntl=72,
        refused=(73, 29, 30, 31, 67, 64, 65, 66, 220, 68, 69, 70, 71, *range(240, 246), 253, 254, 294, 300, 301, 27)
        + (298, 248, 249, 250, 323, 425, 426, 427, 321, 101, 310, 311, 312),
    ),
    "aarch64": dict(
        arch=0xC00000B7,
        clone=220,
        clone3=435,
        forks=(),
        fcntl=25,
        refused=(32, *range(186, 198), *range(180, 186), 26, 27, 262, 263, 232)
        + (241, 217, 218, 219, 282, 425, 426, 427, 280, 117, 270, 271, 272),
    ),
}
_CLONE_THREAD = 0x00010000
_X32_SYSCALL_BIT = 0x40000000
# fcntl commands a process needs for its own descriptors; locks (F_GETLK.., F_OFD_*), leases,
# directory notifications (F_NOTIFY) and signal ownership are refused.
FCNTL_ALLOWED = (
    0,
    1,
    2,
    3,
    4,
    1030,
    1031,
    1032,
    1033,
    1034,
)  # DUPFD GETFD SETFD GETFL SETFL DUPFD_CLOEXEC, pipe size, seals

_LD_W, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _KILL, _ERRNO = 0x7FFF0000, 0x80000000, 0x00050000


def _assemble(program: list) -> bytes:
    """Classic BPF from ("label", name) marks and (code, k, true_label, false_label) instructions;
    a jump's offsets are counted from the next instruction."""
    at, index = {}, 0
    for item in program:
        if item[0] == "label":
            at[item[1]] = index
        else:
            index += 1
    out, index = b"", 0
    for item in program:
        if item[0] == "label":
            continue
        code, k, yes, no = item
        jt = at[yes] - index - 1 if yes else 0
        jf = at[no] - index - 1 if no else 0
        assert 0 <= jt < 256 and 0 <= jf < 256, "a jump too far for classic BPF"
        out += struct.pack("<HBBI", code, jt, jf, k)
        index += 1
    return out


def blocks_filter() -> bytes | None:
    """The seccomp program (bwrap --seccomp reads it) of a process that runs block code: clone only
    with CLONE_THREAD (a thread), clone3 answered ENOSYS (glibc then uses clone), fork and vfork
    EAGAIN; fcntl only on its own descriptors (FCNTL_ALLOWED), the shared kernel objects refused
    (EPERM); any other architecture's calls kill the process. RLIMIT_NPROC does not bind root, this
    does. None on a machine whose numbers are not known here."""
    known = _SYSCALLS.get(platform.machine())
    if known is None:
        return None
    p = [(_LD_W, 4, None, None), (_JEQ, known["arch"], None, "kill"), (_LD_W, 0, None, None)]
    if platform.machine() == "x86_64":
        p.append((_JGE, _X32_SYSCALL_BIT, "enosys", None))
    p.append((_JEQ, known["clone3"], "enosys", None))
    p += [(_JEQ, n, "eagain", None) for n in known["forks"]]
    p += [(_JEQ, n, "eperm", None) for n in known["refused"]]
    p += [(_JEQ, known["fcntl"], "fcntl", None), (_JEQ, known["clone"], "clone", None), (_RET, _ALLOW, None, None)]
    p += [("label", "clone"), (_LD_W, 16, None, None), (_JSET, _CLONE_THREAD, "allow", "eagain")]
    p += [("label", "fcntl"), (_LD_W, 24, None, None)]  # args[1], the command (low word)
    p += [(_JEQ, cmd, "allow", None) for cmd in FCNTL_ALLOWED] + [(_RET, _ERRNO | errno.EPERM, None, None)]
    p += [
        ("label", "allow"),
        (_RET, _ALLOW, None, None),
        ("label", "eagain"),
        (_RET, _ERRNO | errno.EAGAIN, None, None),
    ]
    p += [("label", "enosys"), (_RET, _ERRNO | errno.ENOSYS, None, None), ("label", "eperm")]
    p += [(_RET, _ERRNO | errno.EPERM, None, None), ("label", "kill"), (_RET, _KILL, None, None)]
    return _assemble(p)

"""Child side of the code sandbox: run as a script (`python -I -S sandbox_child.py CONFIG STATUS_FD`) by
`Utils.code_eval.run_program`, it isolates itself, then execs a fresh interpreter on the untrusted program.

Standard library only and no project imports: it starts under `-I -S` and must not trust the caller's paths.

Layers, each applied when the kernel allows it (what applied is reported on the status pipe; a kernel that
refuses namespaces outright gets the other layers; one that accepts them and then refuses a step is a set-up
error, and the caller retries without namespaces):
* namespaces — new mount, network, PID, IPC and UTS namespaces (as root directly; otherwise inside a new user
  namespace that maps only the caller's own uid). Network: only a downed loopback. PID: the program runs under a
  tiny init (pid 1); when the program ends or init is killed, the kernel kills every process left in it.
  Files: the whole tree is remounted read-only, nosuid; the working directory is a fresh size-limited tmpfs.
* identity — as root, the program runs as a per-run unprivileged uid (2e9 + this process's pid, so concurrent
  runs never share a uid and RLIMIT_NPROC counts only this run); `nobody` when that uid cannot be set.
* seccomp — sockets of any family but AF_UNIX, and io_uring, fail with EACCES/EPERM (x86_64, aarch64).
* rlimits — address space, data, CPU seconds, file size, open files, processes, no core files; no_new_privs.
* stage 2 — the program is compiled and run by a small wrapper that reports how it ended through the exit code;
  if no network layer above applied, the wrapper first replaces `socket.socket` (a best-effort guard only).
"""
import ctypes
import json
import os
import resource
import signal
import struct
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 1 << 18
AT_FDCWD, AT_RECURSIVE, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = -100, 0x8000, 0x1, 0x2
SYS_MOUNT_SETATTR = 442  # same number on x86_64 and the generic table (aarch64)
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 1, 38, 22, 2
UID_BASE = 2_000_000_000
EXIT_FAILED, EXIT_ERROR, EXIT_EXITED, EXIT_SETUP = 101, 102, 103, 125

# Stage 2, run by the fresh interpreter as `-c`: exit 0 only if the program ran to its end. An explicit exit
# (sys.exit, even with 0) is reported apart, because tests after it never ran.
STAGE2 = r'''
import sys, os
def _guard():
    import socket, _socket
    def deny(*a, **k):
        raise PermissionError(13, "network access is disabled in this sandbox")
    class GuardedSocket(_socket.socket):
        def __init__(self, family=-1, type=-1, proto=-1, fileno=None):
            if fileno is None and family != socket.AF_UNIX:
                deny()
            super().__init__(family, type, proto, fileno)
    init = socket.socket.__init__
    def guarded_init(self, family=-1, type=-1, proto=-1, fileno=None):
        if fileno is None and family != socket.AF_UNIX:
            deny()
        init(self, family, type, proto, fileno)
    socket.socket.__init__ = guarded_init
    _socket.socket = _socket.SocketType = GuardedSocket
    socket.create_connection = socket.getaddrinfo = deny
def _main():
    import traceback
    path = sys.argv[1]
    if sys.argv[2] == "guard":
        _guard()
    with open(path, encoding="utf-8", errors="replace") as f:
        src = f.read()
    sys.argv = [path]
    code = None
    try:
        code = compile(src, path, "exec")
    except (SyntaxError, ValueError):
        traceback.print_exc(limit=0)
        return %(error)d
    try:
        exec(code, {"__name__": "__main__", "__file__": path, "__builtins__": __builtins__})
    except SystemExit as e:
        sys.stderr.write("SystemExit(%%r): the program exited before its end\n" %% (e.code,))
        return %(exited)d
    except BaseException as e:  # the traceback starts at the program: our frame is noise
        traceback.print_exception(type(e), e, e.__traceback__.tb_next)
        return %(failed)d if isinstance(e, AssertionError) else %(error)d
    return 0
_rc = _main()
for _s in (sys.stdout, sys.stderr):
    try:
        _s.flush()
    except Exception:
        pass
os._exit(_rc)
''' % {"failed": EXIT_FAILED, "error": EXIT_ERROR, "exited": EXIT_EXITED}

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)


def enter_namespaces(as_root):
    """unshare; in a user namespace (non-root) map our own uid/gid onto themselves so files keep their owner.
    False when the kernel refuses (nothing changed: the caller falls back); later failures raise."""
    uid, gid = os.getuid(), os.getgid()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if _libc.unshare(flags if as_root else flags | CLONE_NEWUSER) != 0:
        return False
    if not as_root:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", "%d %d 1" % (uid, uid))
        _write("/proc/self/gid_map", "%d %d 1" % (gid, gid))
    return True


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def private_tree(workdir, size_mb, owner, notes):
    """Our copy of the mount tree: private, read-only and nosuid everywhere (True), then a fresh tmpfs at
    `workdir`. A kernel without mount_setattr leaves the tree writable (False, noted); other failures raise."""
    _check(_libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
    attr = _MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    # mount_setattr (Linux 5.12+) is the only call that makes a whole tree read-only at once.
    readonly = _libc.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr),
                             ctypes.sizeof(attr)) == 0
    if not readonly:
        notes.append("read-only tree unavailable: %s" % os.strerror(ctypes.get_errno()))
    opts = "size=%dm,mode=0700,uid=%d,gid=%d" % (size_mb, owner, owner)
    _check(_libc.mount(b"sandbox", workdir.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, opts.encode()), "tmpfs")
    return readonly


def seccomp_filter():
    """BPF program denying socket() for every family but AF_UNIX, and io_uring_setup; None on other arches."""
    arch = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}.get(os.uname().machine)
    if arch is None:
        return None
    audit_arch, nr_socket = arch
    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06
    allow, kill = 0x7FFF0000, 0x80000000
    deny = lambda err: 0x00050000 | err  # noqa: E731  SECCOMP_RET_ERRNO
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, audit_arch), (ret, 0, 0, kill),      # foreign ABI (i386): kill
            (ld, 0, 0, 0), (jge, 0, 1, 0x40000000), (ret, 0, 0, deny(1)),   # x32 numbers: deny
            (jeq, 0, 1, 425), (ret, 0, 0, deny(1)),                         # io_uring_setup
            (jeq, 1, 0, nr_socket), (ret, 0, 0, allow),
            (ld, 0, 0, 16), (jeq, 0, 1, 1), (ret, 0, 0, allow),            # socket(AF_UNIX, ...)
            (ret, 0, 0, deny(13))]
    return b"".join(struct.pack("HBBI", *ins) for ins in prog)


def install_seccomp(code):
    buf = ctypes.create_string_buffer(code)

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    prog = Prog(len(code) // 8, ctypes.addressof(buf))
    _check(_libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0), "seccomp")


def _processes_of(uid):
    n = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            n += os.stat("/proc/" + pid).st_uid == uid
        except OSError:
            pass
    return n


def exec_program(cfg, status_fd, drop_to, net_guard):
    """In the forked program process: limits, identity, filters, then exec stage 2. Never returns."""
    try:
        os.chdir(cfg["workdir"])
        use_seccomp = cfg["seccomp"]
        code = seccomp_filter() if use_seccomp else None
        _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        if drop_to is not None:
            os.setgroups([])
            os.setresgid(drop_to, drop_to, drop_to)
            os.setresuid(drop_to, drop_to, drop_to)
        mem = cfg["memory_mb"] << 20
        nproc = cfg["nproc"] + (0 if drop_to is not None else _processes_of(os.getuid()))
        for res, soft, hard in ((resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_DATA, mem, mem),
                                (resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1),
                                (resource.RLIMIT_FSIZE, cfg["fsize_mb"] << 20, cfg["fsize_mb"] << 20),
                                (resource.RLIMIT_CORE, 0, 0), (resource.RLIMIT_NOFILE, 64, 64),
                                (resource.RLIMIT_NPROC, nproc, nproc)):
            resource.setrlimit(res, (soft, hard))
        if code is not None:
            install_seccomp(code)
        env = {"PATH": "/usr/bin:/bin", "HOME": cfg["workdir"], "TMPDIR": cfg["workdir"],
               "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
        argv = [cfg["python"], "-I", "-S", "-B", "-c", STAGE2, "program.py", "guard" if net_guard else "-"]
        # Every inherited descriptor goes; the status pipe stays open until exec succeeds (close-on-exec), so a
        # failed exec is still reported on it.
        os.closerange(3, status_fd)
        os.closerange(status_fd + 1, 1 << 16)
        os.set_inheritable(status_fd, False)
        os.execve(cfg["python"], argv, env)
    except BaseException as e:  # noqa: BLE001 — anything here is a set-up failure, reported, never raised
        try:
            os.write(status_fd, (json.dumps({"setup_error": "%s: %s" % (type(e).__name__, e)}) + "\n").encode())
        finally:
            os._exit(EXIT_SETUP)


def wait_for(pid, status_fd, reap_all):
    """Wait for the program; as a PID-namespace init also reap orphans. Report how the program ended."""
    while True:
        try:
            done, status = os.waitpid(-1 if reap_all else pid, 0)
        except ChildProcessError:
            return
        if done == pid:
            break
    rec = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
    os.write(status_fd, (json.dumps(rec) + "\n").encode())


def setup(cfg, status_fd):
    """Everything before the fork: identity, namespaces, file tree, filters. Returns (in_ns, drop_to, guard)."""
    as_root = os.geteuid() == 0
    with open(os.path.join(cfg["workdir"], "program.py"), "rb") as f:
        source = f.read()
    layers, notes = [], []
    drop_to = None
    if as_root:
        drop_to = UID_BASE + os.getpid()
        try:  # a uid the kernel's uid map refuses (some containers) → nobody
            os.chown(cfg["workdir"], drop_to, drop_to)
        except OSError:
            drop_to = 65534
            os.chown(cfg["workdir"], drop_to, drop_to)
        layers.append("uid")
    in_ns = bool(cfg["namespaces"]) and enter_namespaces(as_root)
    if in_ns:
        layers += ["netns", "pidns"]
        owner = drop_to if drop_to is not None else os.getuid()
        if private_tree(cfg["workdir"], cfg["fsize_mb"] * 4, owner, notes):
            layers.append("readonly-fs")
        path = os.path.join(cfg["workdir"], "program.py")
        with open(path, "wb") as f:  # into the fresh tmpfs that now hides the parent's copy
            f.write(source)
        if drop_to is not None:
            os.chown(path, drop_to, drop_to)
    elif cfg["namespaces"]:
        notes.append("namespaces unavailable: %s" % os.strerror(ctypes.get_errno()))
    cfg["seccomp"] = bool(cfg["seccomp"]) and seccomp_filter() is not None
    if cfg["seccomp"]:
        layers.append("seccomp")
    guard = not in_ns and not cfg["seccomp"]
    if guard:
        layers.append("socket-guard")
    os.write(status_fd, (json.dumps({"setup": layers, "uid": drop_to, "notes": notes}) + "\n").encode())
    return in_ns, drop_to, guard


def main():
    cfg, status_fd = json.loads(sys.argv[1]), int(sys.argv[2])
    try:
        in_ns, drop_to, guard = setup(cfg, status_fd)
    except BaseException as e:  # noqa: BLE001 — reported to the caller, which refuses to score
        os.write(status_fd, (json.dumps({"setup_error": "%s: %s" % (type(e).__name__, e)}) + "\n").encode())
        sys.exit(EXIT_SETUP)
    init = os.fork() if in_ns else 0  # in a new PID namespace the first child is its pid 1
    if init:
        os.waitpid(init, 0)
        return
    if in_ns:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # our parent killed → init dies → all die
    child = os.fork()
    if child == 0:
        exec_program(cfg, status_fd, drop_to, guard)
    wait_for(child, status_fd, reap_all=in_ns)
    os._exit(0)


if __name__ == "__main__":
    main()

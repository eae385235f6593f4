"""The sandbox's inner side: confine this process, then become the candidate program.

Run as: python -I confine.py SETTINGS_JSON < program.py

`sandbox.py` starts this script by its path under `python -I`, so it imports only the
standard library and nothing from the user's environment. It reads the program from stdin,
closes stdin, and then, in "namespaces" mode (Linux):
  - enters new mount, network and PID namespaces (and a user namespace when not root);
  - makes every mount read-only and nosuid, hides the home directory behind an empty tmpfs
    (bringing back only the Python installation, read-only, if it lives there), and puts
    fresh private tmpfs on /tmp, /var/tmp and /dev/shm; the program runs in /tmp/work;
  - forks the program as PID 1 of the new PID namespace, so every process it starts dies
    with it, and as an unprivileged user id of its own when started by root; kills it at the
    wall-clock limit and exits only when all of its processes are gone.
In "basic" mode it only applies the limits and runs in the directory it was given.
Either way the program runs as `python -I program.py` with an empty environment under
rlimits on CPU time, address space, file size, open files and processes.
"""

import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID, AT_RECURSIVE, AT_FDCWD = 0x1, 0x2, 0x8000, -100
SYS_MOUNT_SETATTR = 442  # the same number on every Linux architecture (added in 5.12)
PR_SET_PDEATHSIG = 1
# Exit statuses of this launcher: the namespaces cannot be set up, or the wall-clock limit ended the program.
ISOLATION_FAILED, TIMED_OUT = 125, 124
WORKDIR = "/tmp/work"
PROGRAM = "program.py"

LIBC = ctypes.CDLL(None, use_errno=True)


def check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    encode = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    check(LIBC.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
          f"mount {target}")


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def make_all_mounts_read_only() -> None:
    attr = MountAttr(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, 0, 0, 0)
    check(LIBC.syscall(SYS_MOUNT_SETATTR, AT_FDCWD, b"/", AT_RECURSIVE, ctypes.byref(attr), ctypes.sizeof(attr)),
          "mount_setattr /")


def enter_namespaces(settings: dict) -> None:
    uid, gid = os.getuid(), os.getgid()
    as_root = uid == 0
    check(LIBC.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | (0 if as_root else CLONE_NEWUSER)), "unshare")
    if not as_root:
        # The same ids inside as outside: the program keeps no capability after exec.
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    home, prefix = settings["home"], settings["python_prefix"]
    hide_home = home not in ("", "/") and os.path.isdir(home)
    # Opened before the home directory is covered, to be mounted back from this handle.
    prefix_fd = os.open(prefix, os.O_PATH | os.O_DIRECTORY) if hide_home and is_inside(prefix, home) else None
    make_all_mounts_read_only()
    if hide_home:
        mount("tmpfs", home, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        if prefix_fd is not None:
            os.makedirs(prefix, exist_ok=True)
            mount(f"/proc/self/fd/{prefix_fd}", prefix, None, MS_BIND | MS_REC)  # read-only, as its source
            os.close(prefix_fd)
    for scratch in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(scratch):
            mount("tmpfs", scratch, "tmpfs", MS_NOSUID | MS_NODEV, f"size={settings['scratch_mb']}m,mode=1777")


def is_inside(path: str, directory: str) -> bool:
    return os.path.commonpath([path, directory]) == directory


def limit(settings: dict) -> None:
    cpu = settings["cpu_seconds"]
    # PID 1 of a namespace ignores SIGXCPU at the soft limit; the hard limit's SIGKILL reaches it.
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    for name, value in (("RLIMIT_AS", settings["memory_bytes"]), ("RLIMIT_FSIZE", settings["file_bytes"]),
                        ("RLIMIT_NOFILE", settings["open_files"]), ("RLIMIT_CORE", 0),
                        ("RLIMIT_NPROC", settings["processes"])):
        if hasattr(resource, name):
            _, hard = resource.getrlimit(getattr(resource, name))
            value = value if hard == resource.RLIM_INFINITY else min(value, hard)  # only ever lowered
            resource.setrlimit(getattr(resource, name), (value, value))


def become_program(settings: dict, workdir: str) -> None:
    limit(settings)
    if settings["uid"] is not None:
        os.setgroups([])
        os.setgid(settings["uid"])
        os.setuid(settings["uid"])
    os.chdir(workdir)
    os.umask(0o077)
    python = settings["python"]
    os.execve(python, [python, "-I", PROGRAM], {})


def main() -> None:
    settings = json.loads(sys.argv[1])
    program = sys.stdin.buffer.read()
    os.close(0)
    if settings["mode"] == "basic":
        with open(os.path.join(settings["workdir"], PROGRAM), "wb") as f:
            f.write(program)
        become_program(settings, settings["workdir"])
    try:
        enter_namespaces(settings)
    except OSError as e:
        print(f"sandbox: isolation unavailable: {e}", file=sys.stderr)
        sys.exit(ISOLATION_FAILED)
    os.mkdir(WORKDIR, 0o700)
    with open(os.path.join(WORKDIR, PROGRAM), "wb") as f:
        f.write(program)
    if settings["uid"] is not None:
        for path in (WORKDIR, os.path.join(WORKDIR, PROGRAM)):
            os.chown(path, settings["uid"], settings["uid"])
    child = os.fork()
    if child == 0:
        try:
            check(LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl")  # if this launcher is killed
            # A /proc of the new PID namespace: other processes and their environments stay invisible.
            mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
            become_program(settings, WORKDIR)
        except OSError as e:
            print(f"sandbox: {e}", file=sys.stderr)
            os._exit(ISOLATION_FAILED)
    # The wall-clock limit is kept here, not by killing this process from outside: reaping the
    # program's PID 1 returns only once every process of its namespace is gone.
    ended_by_clock = []

    def on_deadline(*_):
        ended_by_clock.append(True)
        os.kill(child, signal.SIGKILL)

    signal.signal(signal.SIGALRM, on_deadline)
    signal.setitimer(signal.ITIMER_REAL, settings["wall_seconds"])
    _, status = os.waitpid(child, 0)
    if ended_by_clock:
        sys.exit(TIMED_OUT)
    sys.exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()

"""Stand-in for Firecracker's jailer (v1.0.0), for unit tests: no root, no binaries.

Installed by ``standin_host.py`` as an executable next to ``standin.json`` (its control
file). It parses the real jailer's argv, makes the real jailer's layout under the chroot
base (``<base>/<resolved exec name>/<id>/root`` with ``dev/``, ``run/``, a copy of the exec
file, the pid file ``<exec name>.pid`` with ``--new-pid-ns``), writes every ``--cgroup``
value into the (fake) cgroup tree without creating files, attaches the VMM there, and runs
the copied exec file with its working directory as its "chroot" (a real chroot needs root).
Each run is logged to ``standin.json``'s ``"spawns"`` file (one JSON line).
``standin.json``'s ``"fail"`` makes it fail at a chosen step (see ``FAILS``).
"""

import json
import os
import re
import resource
import shutil
import sys
import time
from pathlib import Path

FAILS = ("before-chroot", "no-pidfile", "exit-after-pidfile")
VALUED = {
    "--id", "--exec-file", "--uid", "--gid", "--chroot-base-dir", "--netns",
    "--cgroup-version", "--parent-cgroup", "--cgroup", "--resource-limit",
}  # fmt: skip


def die(reason: str) -> None:
    print(f"Jailer error: {reason}", file=sys.stderr, flush=True)
    sys.exit(134)  # v1.0 panics with the error


def log_spawn(ctl: dict, program: str, argv: list[str]) -> None:
    """One JSON line per run (``--version`` aside): a test can tell a start was attempted."""
    if ctl.get("spawns"):
        with open(ctl["spawns"], "a") as log:
            log.write(json.dumps({"program": program, "pid": os.getpid(), "argv": argv}) + "\n")


def parse(argv: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    opts: dict[str, list[str]] = {}
    i = 0
    while i < len(argv) and argv[i] != "--":
        flag = argv[i]
        if flag == "--new-pid-ns":
            opts[flag] = []
        elif flag in VALUED and i + 1 < len(argv):
            opts.setdefault(flag, []).append(argv[i + 1])
            i += 1
        else:
            die(f"Arguments parsing error: Found argument '{flag}' which wasn't expected")
        i += 1
    for required in ("--id", "--exec-file", "--uid", "--gid"):
        if required not in opts:
            die(f"Arguments parsing error: Argument '{required.lstrip('-')}' required")
    return opts, argv[i + 1 :]


def cgroup_dirs(opts: dict[str, list[str]], ctl: dict, vm_id: str) -> dict[str, Path]:
    """Write each ``--cgroup file=value``; return controller -> the VM's cgroup dir."""
    version = opts.get("--cgroup-version", ["1"])[0]
    parent = opts.get("--parent-cgroup", [Path(opts["--exec-file"][0]).name])[0]
    mounts = ctl["cgroup_mounts"]
    dirs: dict[str, Path] = {}
    for arg in opts.get("--cgroup", []):
        file, _, value = arg.partition("=")
        controller = file.split(".")[0]
        key = "unified" if version == "2" else controller
        if key not in mounts:
            die(f"Cgroup error: Controller {controller} is unavailable")
        d = Path(mounts[key]) / parent / vm_id
        try:  # a cgroup file: it exists or the kernel lacks it (never O_CREAT)
            fd = os.open(d / file, os.O_WRONLY | os.O_TRUNC)  # a write sets the value
            os.write(fd, value.encode())
            os.close(fd)
        except OSError as exc:
            die(f"Failed to write to {d / file}: {exc.strerror}")
        dirs[key] = d
    return dirs


def attach(dirs: dict[str, Path], pid: int) -> None:
    """What the kernel shows once the jailer joined the cgroups (its VMM inherits them)."""
    for d in dirs.values():
        for name in ("cgroup.procs", "tasks"):
            if (d / name).exists():
                with open(d / name, "a") as fh:
                    fh.write(f"{pid}\n")


def main() -> None:
    argv = sys.argv[1:]
    if argv == ["--version"]:
        print("Jailer v1.0.0")
        return
    ctl = json.loads(Path(__file__).with_name("standin.json").read_text())
    log_spawn(ctl, "jailer", argv)
    opts, fc_args = parse(argv)
    vm_id = opts["--id"][0]
    if not re.fullmatch(r"[A-Za-z0-9-]{1,64}", vm_id):
        die(f"Invalid instance ID: {vm_id}")
    if ctl.get("fail") == "before-chroot":
        die("Failed to canonicalize path /nowhere: No such file or directory")
    exec_file = Path(os.path.realpath(opts["--exec-file"][0]))  # canonicalised, like the real one
    base = Path(opts.get("--chroot-base-dir", ["/srv/jailer"])[0])
    if not base.is_dir():
        die(f"Failed to canonicalize path {base}: No such file or directory")
    for netns in opts.get("--netns", []):
        if not os.path.exists(netns):
            die(f"Failed to open {netns}: No such file or directory")
    chroot = base / exec_file.name / vm_id / "root"
    for sub in ("dev/net", "run"):
        (chroot / sub).mkdir(parents=True, exist_ok=True)
    for node in ("dev/kvm", "dev/net/tun", "dev/urandom"):
        (chroot / node).touch()  # device nodes need root: plain files stand in
    shutil.copy2(exec_file, chroot / exec_file.name)
    for limit in opts.get("--resource-limit", []):
        name, _, value = limit.partition("=")
        which = {"no-file": resource.RLIMIT_NOFILE, "fsize": resource.RLIMIT_FSIZE}[name]
        resource.setrlimit(which, (int(value), int(value)))
    dirs = cgroup_dirs(opts, ctl, vm_id)
    os.chdir(chroot)
    fc = [str(chroot / exec_file.name), "--id", vm_id, *fc_args]
    env = {"STANDIN_CONTROL": str(Path(__file__).with_name("standin.json"))}
    if "--new-pid-ns" not in opts:
        attach(dirs, os.getpid())
        os.execve(fc[0], fc, env)
    pid = os.fork()
    if pid == 0:
        os.execve(fc[0], fc, env)
    attach(dirs, pid)
    if ctl.get("fail") in ("no-pidfile", "exit-after-pidfile"):
        # The VMM is up and serving before the jailer fails: a rollback must kill it.
        sock = chroot / fc_args[fc_args.index("--api-sock") + 1].lstrip("/")
        for _ in range(1000):
            if sock.exists():
                break
            time.sleep(0.01)
    if ctl.get("fail") != "no-pidfile":
        (chroot / f"{exec_file.name}.pid").write_text(str(pid))
    if ctl.get("fail") == "exit-after-pidfile":
        die("Failed to set up the VMM: injected by standin.json")


if __name__ == "__main__":
    main()

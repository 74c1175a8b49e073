"""Finding the firecracker and jailer binaries and reading their versions.

Search order for each binary: the explicit config value, then ``IRONCLAW_FIRECRACKER`` /
``IRONCLAW_JAILER``, then ``firecracker`` / ``jailer`` on ``PATH``, then the spec's defaults
(``/usr/local/bin/firecracker-v1.14.1``, ``/usr/local/bin/jailer``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
from dataclasses import dataclass
from functools import total_ordering
from pathlib import Path

from .. import paths, safefs
from ..errors import BinaryNotFoundError, ConfigError, JailerNotFoundError, VersionMismatchError
from ..names import exec_file_name
from .config import DEFAULT_EXEC_FILE, DEFAULT_JAILER_BINARY, JailerConfig

FIRECRACKER_ENV = "IRONCLAW_FIRECRACKER"
JAILER_ENV = "IRONCLAW_JAILER"
INSTALL_HINT = (
    "install them with `ironclaw install` (or copy release-vX-<arch>/jailer and "
    "firecracker-vX-<arch> from a Firecracker release to /usr/local/bin, mode 0755), "
    f"or point {FIRECRACKER_ENV} / {JAILER_ENV} at them"
)

_VERSION_RE = re.compile(r"v(\d+)\.(\d+)\.(\d+)(\S*)")


@total_ordering
@dataclass(frozen=True)
class Version:
    """A Firecracker release version such as ``v1.14.1`` (build suffix kept, not compared)."""

    major: int
    minor: int
    patch: int
    suffix: str = ""

    @classmethod
    def parse(cls, text: str) -> Version:
        m = _VERSION_RE.search(text)
        if not m:
            raise ValueError(f"no version like v1.2.3 in {text!r}")
        return cls(int(m[1]), int(m[2]), int(m[3]), m[4])

    @property
    def release(self) -> tuple[int, int, int]:
        return (self.major, self.minor, self.patch)

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.release < other.release

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Version):
            return NotImplemented
        return self.release == other.release

    def __hash__(self) -> int:
        return hash(self.release)

    def __str__(self) -> str:
        return f"v{self.major}.{self.minor}.{self.patch}{self.suffix}"


#: The word each release binary's ``--version`` starts with (v1.0 .. v1.16 print
#: ``Firecracker v1.14.1`` / ``Jailer v1.14.1`` and a blank line; a build from a git checkout
#: adds ``-<commits>-g<sha>[-dirty]``; v1.0's firecracker then lists snapshot versions).
VERSION_BANNERS = {"firecracker": "Firecracker", "jailer": "Jailer"}


def parse_version_output(program: str, output: str) -> Version:
    """The release ``program`` (``firecracker`` or ``jailer``) names in its ``--version`` output.

    Stricter than :meth:`Version.parse`: the first non-empty line must be exactly the
    program's banner and a version, so a jailer that is really firecracker (or a script that
    prints something else) is told apart. Raises ``ValueError`` quoting what was printed.
    """
    banner = VERSION_BANNERS[program]
    first = next((line.strip() for line in output.splitlines() if line.strip()), "")
    word, _, rest = first.partition(" ")
    if word != banner or _VERSION_RE.fullmatch(rest) is None:
        shown = f"{first[:80]!r}" if first else "nothing"
        raise ValueError(f"expected '{banner} vX.Y.Z' as the first line, got {shown}")
    return Version.parse(rest)


#: What a file was when last looked at: device, inode, mode, owner, size, times (``chmod``,
#: ``chown`` and ACL changes move the ctime). ``None``: missing (or not inspectable).
_FileState = tuple[int, ...] | None
#: ``(name, PATH, euid, egid)`` -> the state of each ``<dir>/<name>`` ``shutil.which``
#: looked at, in PATH order, the last one being the file it found.
_on_path: dict[tuple[str, str, int, int], tuple[tuple[str, _FileState], ...]] = {}


def _file_state(path: str) -> _FileState:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_size,
            st.st_mtime_ns, st.st_ctime_ns)  # fmt: skip


def _which(name: str) -> Path | None:
    """``shutil.which(name)``, remembered per PATH while nothing it looked at changed.

    Every start asks, and a PATH scan costs several probes per directory in Python. The
    answer is reused only while the found file and each ``<dir>/<name>`` searched before it
    are as they were (one ``stat`` each): a binary installed, made executable or removed
    earlier on PATH, or the found one replaced or made non-executable, scans again. A PATH
    with relative entries (the current directory) is never remembered.
    """
    path_env = os.environ.get("PATH")
    key = (name, path_env or "", os.geteuid(), os.getegid())
    probes = _on_path.get(key)
    if probes is not None and all(_file_state(p) == was for p, was in probes):
        return Path(probes[-1][0])
    dirs = list(dict.fromkeys((path_env or "").split(os.pathsep)))  # which's order
    paths = [os.path.join(d, name) for d in dirs]
    cacheable = bool(path_env) and all(os.path.isabs(d) for d in dirs)
    # Looked at before the scan: a change during it shows as a difference next time.
    looked = [(p, _file_state(p)) for p in paths] if cacheable else []
    found = shutil.which(name)
    if found is None:
        return None
    if looked and found in paths and looked[paths.index(found)][1] is not None:
        if len(_on_path) >= 16:
            _on_path.clear()
        _on_path[key] = tuple(looked[: paths.index(found) + 1])
    return Path(found)


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_firecracker(explicit: Path | None = None) -> Path:
    """Locate the firecracker binary (see module docstring for the order)."""
    return _find("firecracker", explicit, FIRECRACKER_ENV, DEFAULT_EXEC_FILE, BinaryNotFoundError)


def find_jailer(explicit: Path | None = None) -> Path:
    """Locate the jailer binary (see module docstring for the order)."""
    return _find("jailer", explicit, JAILER_ENV, DEFAULT_JAILER_BINARY, JailerNotFoundError)


def _find(
    name: str,
    explicit: Path | None,
    env: str,
    default: Path,
    error: type[BinaryNotFoundError],
) -> Path:
    tried: list[str] = []
    if explicit is not None:
        if _executable(explicit):
            return explicit
        raise error(
            f"{name} binary not found at {explicit} (configured explicitly): "
            f"check the path and that it is executable, or {INSTALL_HINT}"
        )
    env_value = os.environ.get(env)
    if env_value:
        path = Path(env_value)
        if _executable(path):
            return path
        raise error(
            f"{name} binary not found at {path} (from ${env}): "
            f"fix or unset {env}, or {INSTALL_HINT}"
        )
    tried.append(f"${env} (unset)")
    on_path = _which(name)
    if on_path is not None:
        return on_path
    tried.append(f"{name!r} on PATH")
    if _executable(default):
        return default
    tried.append(str(default))
    raise error(f"{name} binary not found at {default} (tried {', '.join(tried)}): {INSTALL_HINT}")


#: In this process: (resolved path, dev, inode, size, mtime, ctime) -> version.
#: (resolved path, st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns, program)
_FileKey = tuple[str, int, int, int, int, int, str]
_version_cache: dict[_FileKey, Version] = {}
#: Across processes (every `ironclaw` command would otherwise run both binaries): a small
#: JSON file in the run directory, trusted only if it is ours and nobody else can write it.
VERSION_CACHE_FILE = "binary-versions.json"
_MAX_CACHE_BYTES = 64 * 1024
_MAX_CACHE_ENTRIES = 32

log = logging.getLogger(__name__)


def read_version(binary: Path, program: str) -> Version:
    """Run ``binary --version`` once per file and parse the release ``program`` names.

    ``program`` is ``"firecracker"`` or ``"jailer"``: the output must carry that program's
    banner (:func:`parse_version_output`), so a jailer that is really firecracker is refused
    here too, not only by ``ironclaw install``.

    A file is the same while its path, device, inode, size, mtime and ctime are: replacing
    or touching it runs ``--version`` again. Results persist in the run directory (see
    ``VERSION_CACHE_FILE``), so a command-line run does not start both binaries each time.
    """
    st = binary.stat()
    resolved = str(binary.resolve())
    key = (resolved, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, program)
    cached = _version_cache.get(key)
    if cached is None:
        cached = _disk_cache_get(key)
    if cached is not None:
        _version_cache[key] = cached
        return cached
    try:
        out = subprocess.run(
            [str(binary), "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise BinaryNotFoundError(
            f"could not run {binary} --version: {exc}; check it is a Firecracker release "
            "binary for this architecture"
        ) from exc
    try:
        version = parse_version_output(program, out.stdout + out.stderr)
    except ValueError as exc:
        raise BinaryNotFoundError(
            f"{binary} is not {program}: its --version output does not name it ({exc}); "
            f"install the {program} binary of a Firecracker release there "
            "(`ironclaw install --version vX.Y.Z`)"
        ) from None
    _version_cache[key] = version
    _disk_cache_put(key, version)
    return version


def _disk_cache_path() -> Path | None:
    root = paths.default_run_dir(create=False)
    if safefs.swappable_reason(root) is not None:
        return None  # missing, or others could swap it: no cache at all
    return root / VERSION_CACHE_FILE


def _disk_cache_load(path: Path) -> dict[str, object]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return {}
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if st.st_uid != os.geteuid() or st.st_mode & 0o022 or not stat.S_ISREG(st.st_mode):
            return {}
        raw = fh.read(_MAX_CACHE_BYTES + 1)
    try:
        data = json.loads(raw) if len(raw) <= _MAX_CACHE_BYTES else {}
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _disk_cache_get(key: _FileKey) -> Version | None:
    path = _disk_cache_path()
    if path is None:
        return None
    entry = _disk_cache_load(path).get(key[0])
    if not isinstance(entry, dict) or entry.get("file") != list(key[1:]):
        return None
    try:
        return Version.parse(str(entry.get("version")))
    except ValueError:
        return None


def _disk_cache_put(key: _FileKey, version: Version) -> None:
    path = _disk_cache_path()
    if path is None:
        return
    data = _disk_cache_load(path)
    data.pop(key[0], None)
    # Bounded: forget binaries that are gone, keep the most recent few.
    kept = [(k, v) for k, v in data.items() if os.path.exists(k)][-(_MAX_CACHE_ENTRIES - 1) :]
    data = dict(kept)
    data[key[0]] = {"file": list(key[1:]), "version": str(version)}
    tmp = path.with_name(f".{VERSION_CACHE_FILE}.{secrets.token_hex(4)}")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)
        safefs.replace_file(tmp, path)
    except OSError as exc:  # only a cache: a read-only or full run dir costs a re-run
        log.debug("not caching binary versions in %s: %s", path, exc)
        with contextlib.suppress(OSError):
            tmp.unlink()


@dataclass(frozen=True)
class Binaries:
    """A matching jailer + firecracker pair."""

    jailer: Path
    firecracker: Path
    version: Version


def check_pair(jailer: Path, firecracker: Path) -> Binaries:
    """Read both versions and refuse a mismatch (the jailer must match its firecracker)."""
    jv = read_version(jailer, "jailer")
    fv = read_version(firecracker, "firecracker")
    if jv.release != fv.release:
        raise VersionMismatchError(
            f"jailer {jailer} is {jv} but firecracker {firecracker} is {fv}: they must come "
            "from the same Firecracker release; install both from one release archive "
            "(`ironclaw install --version vX.Y.Z`)"
        )
    check_exec_file_name(firecracker, fv)
    return Binaries(jailer=jailer, firecracker=firecracker, version=fv)


def check_exec_file_name(exec_file: Path, version: Version) -> None:
    """Jailer v1.2 .. v1.12 refuse an exec file whose name lacks "firecracker".

    The jailer checks the name of the *resolved* file (it canonicalises ``--exec-file``), so
    a symlink named ``firecracker`` to ``vmm-v1.5.0`` is refused as well.
    """
    name = exec_file_name(exec_file)
    if (1, 2, 0) <= version.release < (1, 13, 0) and "firecracker" not in name:
        raise ConfigError(
            f"exec_file {exec_file} (resolved name {name!r}): jailer {version} requires the "
            "file name to contain 'firecracker'; rename the file itself (e.g. firecracker-"
            f"{version}): a symlink does not help, the jailer resolves it"
        )


#: (explicit paths, environment, PATH) -> (the pair, identity of both files when checked).
_pairs: dict[tuple[object, ...], tuple[Binaries, tuple[tuple[int, int, int, int], ...]]] = {}


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = os.stat(path)  # follows a symlink: re-pointing it is a change
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def resolve_binaries(config: JailerConfig) -> Binaries:
    """Find the jailer and firecracker for ``config`` and check that their versions match.

    Found and checked once per process; afterwards one ``stat`` per binary tells whether
    either was replaced (then everything is checked again).
    """
    explicit_jailer = config.jailer_binary if "jailer_binary" in config.model_fields_set else None
    explicit_exec = config.exec_file if "exec_file" in config.model_fields_set else None
    key = (
        explicit_jailer,
        explicit_exec,
        os.environ.get(JAILER_ENV),
        os.environ.get(FIRECRACKER_ENV),
        os.environ.get("PATH"),
    )
    cached = _pairs.get(key)
    if cached is not None:
        pair, identity = cached
        with contextlib.suppress(OSError):
            if (_identity(pair.jailer), _identity(pair.firecracker)) == identity:
                return pair
    pair = check_pair(find_jailer(explicit_jailer), find_firecracker(explicit_exec))
    _pairs[key] = (pair, (_identity(pair.jailer), _identity(pair.firecracker)))
    return pair

"""The package's dependency arrows point one way (read from the source, nothing imported).

    cli -> supervisor, detach -> doctor, install, gc -> vm lifecycle
        -> building blocks (jailer args, staging, api, process, cgroups, netns, ...)
        -> vm.config -> primitives (names, /proc, pidfd, safe removal) -> errors

A module may import a module of a lower layer, or one of its own component (a package and
its submodules). Two components of one layer may not import each other, except in the
layers listed in COHESIVE and for the arrows listed in SIDEWAYS.
Only the CLI may import typer or rich. Every module must be placed in a layer, so a new
module is classified when it is added.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

import pytest

import ironclaw_orchestrator

PACKAGE = "ironclaw_orchestrator"
ROOT = Path(ironclaw_orchestrator.__file__).parent

#: Lowest layer first; components are module names relative to the package.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("libc", ("libc",)),
    ("errors", ("errors",)),
    (
        "primitives",
        (
            "fsflags",
            "lsm",
            "names",
            "paths",
            "pidfd",
            "procfs",
            "safefs",
            "safetree",
            "version",
            "vm.cmdline",
            "vm.seccomp",
        ),
    ),
    (
        "config",
        ("vm.api_calls", "vm.config", "vm.config_rules", "vm.jailer_config", "vm.ratelimit"),
    ),
    (
        "building blocks",
        (
            "registry",
            "vm.api",
            "vm.binaries",
            "vm.cancelsafe",
            "vm.cgroups",
            "vm.consolelog",
            "vm.consoleread",
            "vm.context",
            "vm.fswatch",
            "vm.hostcheck",
            "vm.hostroutes",
            "vm.jailer_args",
            "vm.netns",
            "vm.probe",
            "vm.process",
            "vm.rundir",
            "vm.snapshot_api",
            "vm.snapshot_cache",
            "vm.staging",
            "vm.vsock",
        ),
    ),
    # The guest agent and its client (guest side: standard library only); the VM handle
    # reaches it over vm.vsock.
    ("guest agent", ("agent",)),
    (
        "vm lifecycle",
        (
            "vm",
            "vm.cleanup",
            "vm.handle",
            "vm.hardening",
            "vm.inputs",
            "vm.jailer",
            "vm.jailer_process",
            "vm.lifecycle",
            "vm.pool",
            "vm.recording",
            "vm.resources",
            "vm.restore",
            "vm.snapshot",
            "vm.snapshot_base",
            "vm.snapshot_diff",
            "vm.snapshot_dir",
            "vm.snapshot_seal",
            "vm.unjailed",
        ),
    ),
    ("tools", ("doctor", "install", "gc", "security")),
    ("service", ("detach", "supervisor")),
    ("host agent", ("server",)),  # ironclaw serve: the library over HTTP
    ("placement", ("cluster",)),  # Ray actors and Cluster, clients of host agents
    ("cli", ("cli",)),
    # The package root re-exports the public API (lazily): above everything it names.
    ("package root", ("",)),
]
#: Layers whose components may import each other (one pipeline split over modules; the two
#: sides of a detached VM).
COHESIVE = frozenset({"vm lifecycle", "service"})
#: Other arrows allowed between two components of the same layer: (importer, imported).
SIDEWAYS = frozenset(
    {
        ("vm.jailer_args", "vm.binaries"),  # the argv depends on the jailer's version
        ("vm.snapshot_api", "vm.binaries"),  # so do the snapshot request bodies
        ("pidfd", "procfs"),  # a pidfd is opened for a pid whose identity /proc confirms
        ("vm.hostcheck", "vm.netns"),  # where namespaces and the TUN device live
        ("vm.hostcheck", "vm.hostroutes"),  # hostcheck is split by concept: routes apart
        ("vm.config", "vm.ratelimit"),  # VmConfig holds RateLimit models
        ("vm.api_calls", "vm.ratelimit"),  # the API bodies carry rate limiters
        # vm.config is split by concept: VmConfig, JailerConfig, the rules both use.
        ("vm.config", "vm.config_rules"),
        ("vm.config", "vm.jailer_config"),
        ("vm.jailer_config", "vm.config_rules"),
        ("vm.consoleread", "vm.consolelog"),  # reads what the console writer wrote
        ("safetree", "safefs"),  # a hostile tree is walked with safefs's symlink-safe opens
    }
)
UI_LIBRARIES = ("typer", "rich")
UI_LAYER = "cli"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def resolve(modules: Iterable[str], name: str) -> str | None:
    """The module of ours that ``name`` (relative to the package) denotes, or None."""
    known = set(modules)
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return "" if "" in known else None


def imports_of(name: str, path: Path, modules: Iterable[str]) -> list[tuple[str, int]]:
    """``(imported, line)`` for every import in the module (also lazy and type-only ones).

    Ours are given relative to the package; third-party ones as ``!<top-level name>``.
    """
    modules = list(modules)
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    package = here if is_package else here[:-1]
    found: list[tuple[str, int]] = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                absolute = ".".join([PACKAGE, *base, *([node.module] if node.module else [])])
            else:
                absolute = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one.
            targets = [f"{absolute}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            top, _, rest = target.partition(".")
            if top != PACKAGE:
                found.append(("!" + top, node.lineno))
                continue
            ours = resolve(modules, rest)
            if ours is not None and ours != name:
                found.append((ours, node.lineno))
    return found


def component_of(module: str) -> tuple[int, str] | None:
    """``(layer index, component)`` of a module: its longest listed component prefix."""
    best: tuple[int, str] | None = None
    for index, (_, components) in enumerate(LAYERS):
        for component in components:
            # "vm" names the vm package's own module only; its submodules are listed.
            inside = module == component or (
                component != "vm" and module.startswith(component + ".")
            )
            if inside and (best is None or len(component) > len(best[1])):
                best = (index, component)
    return best


def violations(edges: Iterable[tuple[str, str, int]]) -> list[str]:
    """Every arrow that points back, or sideways without leave; every UI import outside cli."""
    problems: list[str] = []
    unplaced: set[str] = set()
    for importer, imported, line in edges:
        src = component_of(importer)
        if src is None:
            if importer not in unplaced:
                unplaced.add(importer)
                problems.append(f"{importer}: not placed in any layer (add it to LAYERS)")
            continue
        src_layer, src_component = src
        if imported.startswith("!"):
            library = imported[1:]
            if library in UI_LIBRARIES and LAYERS[src_layer][0] != UI_LAYER:
                problems.append(f"{importer}:{line} imports {library}: only cli may")
            continue
        dst = component_of(imported)
        if dst is None:
            # (the package's own empty __init__ is in no layer, and that is fine)
            if imported and imported not in unplaced:
                unplaced.add(imported)
                problems.append(f"{imported}: not placed in any layer (add it to LAYERS)")
            continue
        dst_layer, dst_component = dst
        if dst_component == src_component or dst_layer < src_layer:
            continue
        if dst_layer == src_layer and (
            LAYERS[src_layer][0] in COHESIVE or (src_component, dst_component) in SIDEWAYS
        ):
            continue
        how = "back up" if dst_layer > src_layer else "sideways"
        problems.append(
            f"{importer}:{line} imports {imported}: the arrow points {how} "
            f"({LAYERS[src_layer][0]} -> {LAYERS[dst_layer][0]})"
        )
    return problems


def package_edges() -> list[tuple[str, str, int]]:
    modules = all_modules()
    return [
        (name, imported, line)
        for name, path in modules.items()
        for imported, line in imports_of(name, path, modules)
    ]


def test_every_module_is_in_a_layer() -> None:
    unplaced = [m for m in all_modules() if m and component_of(m) is None]
    assert not unplaced, f"place these modules in LAYERS: {unplaced}"


def test_dependency_arrows_point_one_way() -> None:
    problems = violations(package_edges())
    assert not problems, "\n".join(problems)


def test_the_walker_sees_real_imports() -> None:
    edges = {(a, b) for a, b, _ in package_edges()}
    assert ("vm.jailer", "vm.netns") in edges  # ``from . import netns as ns``
    assert ("doctor.checks", "vm.hostcheck") in edges  # ``from ..vm.hostcheck import ...``
    assert ("cli.common", "!typer") in edges
    assert ("doctor.live", "vm") in edges  # a lazy import inside a function


@pytest.mark.parametrize(
    ("edge", "expected"),
    [
        (("vm.config", "vm.jailer", 1), "points back up"),
        (("errors", "vm.config", 1), "points back up"),
        (("vm.netns.tap", "gc", 1), "points back up"),
        (("gc", "doctor.checks", 1), "points sideways"),
        (("vm.netns.names", "vm.cgroups.tree", 1), "points sideways"),
        (("vm.jailer", "cli.common", 1), "points back up"),
        (("vm.config", "vm.staging", 1), "points back up"),
        (("names", "vm.config", 1), "points back up"),
        (("doctor.checks", "install.fetch", 1), "points sideways"),
        (("doctor.report", "!rich", 1), "only cli may"),
        (("vm.newthing", "errors", 1), "not placed in any layer"),
    ],
)
def test_a_wrong_arrow_is_caught(edge: tuple[str, str, int], expected: str) -> None:
    problems = violations([edge])
    assert len(problems) == 1 and expected in problems[0], problems


@pytest.mark.parametrize(
    "edge",
    [
        ("cli.vm", "vm", 1),
        ("gc", "vm.netns", 1),
        ("vm.netns.tap", "vm.netns.kernel", 1),
        ("vm.jailer_args", "vm.binaries", 1),
        ("vm.recording", "vm.jailer", 1),
        ("vm.config", "names", 1),
        ("cli.common", "!typer", 1),
        ("vm.api", "!httptools", 1),
    ],
)
def test_a_right_arrow_passes(edge: tuple[str, str, int]) -> None:
    assert violations([edge]) == []

#!/usr/bin/env python3
"""Mutation testing of the pure modules with mutmut 3, one module at a time.

Usage (from a clean clone; installs the ``[mutation]`` extra into this interpreter if
mutmut is missing)::

    python scripts/mutation.py                 # every module, then the table
    python scripts/mutation.py names archive   # only these modules
    python scripts/mutation.py --report        # the table from the last run, no run
    python scripts/mutation.py --survivors     # ... and the diff of every survivor
    python scripts/mutation.py --markdown      # the table as README markdown
    python scripts/mutation.py --min-score 85  # exit 1 below 85 % killed overall

Only the unit suite (``tests/unit``) may kill a mutant; mutmut runs, for each mutant, only
the unit tests that executed the mutated function. It runs under ``nice -n 10`` with one
worker unless ``--jobs`` says otherwise: the development machines are shared.

Which code is mutated: ``TARGETS`` below, each a file and the functions of it that are pure
(decisions on values; no host I/O). mutmut 3 does not mutate module-level constants nor
functions with decorators other than a lone ``@staticmethod``/``@classmethod`` (pydantic
validators, properties), so those are not counted.

Equivalent mutants (the program behaves the same whatever the input) are listed in
``scripts/mutation_equivalent.toml`` with a reason each; an entry counts only while its
mutant still survives and still makes the change it names, and they are reported apart.

Score = (killed + timeout) / (mutants - equivalent). "no tests" (no unit test runs the
function) counts as survived.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
import tomllib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = ROOT / "scripts" / "mutation_equivalent.toml"
PACKAGE = "ironclaw_orchestrator"


@dataclass(frozen=True)
class Target:
    name: str
    path: str  # relative to src/ironclaw_orchestrator
    #: Mutated functions (``name`` or ``Class.method``); empty: every function of the file.
    functions: tuple[str, ...] = ()

    @property
    def module(self) -> str:
        return f"{PACKAGE}." + self.path.removesuffix(".py").replace("/", ".")

    def globs(self) -> list[str]:
        if not self.functions:
            return [f"{self.module}.x*__mutmut_*"]
        out = []
        for fn in self.functions:
            cls, _, meth = fn.rpartition(".")
            key = f"xǁ{cls}ǁ{meth}" if cls else f"x_{fn}"
            out.append(f"{self.module}.{key}__mutmut_*")
        return out


#: The pure modules. Left out on purpose: vm/inputs.py (only sequences host checks),
#: staging's stage_file/_copy/make_owned_dir and the rest of registry/ (file I/O, locking).
TARGETS: tuple[Target, ...] = (
    Target("config", "vm/config.py"),
    Target("config_rules", "vm/config_rules.py"),
    Target("jailer_config", "vm/jailer_config.py"),
    Target("names", "names.py"),
    Target("paths", "paths.py"),
    Target("jailer_args", "vm/jailer_args.py"),
    Target("cgroup_limits", "vm/cgroups/limits.py"),
    Target(
        "socket_budget",
        "vm/hostcheck.py",
        (
            "socket_path_bytes",
            "check_socket_budget",
            "inspect_socket_budget",
        ),
    ),
    Target("uplink_routes", "vm/hostroutes.py", ("route_conflicts", "check_uplink_routes")),
    Target(
        "staging",
        "vm/staging.py",
        (
            "image_dirs_from_env",
            "effective_image_dirs",
            "confine",
            "check_source",
            "host_path_in",
            "linkable",
        ),
    ),
    Target(
        "registry",
        "registry/record.py",
        (
            "check_vm_id",
            "record_name",
            "log_name",
            "encode_record",
            "pad_record",
            "decode_record",
            "make_record",
        ),
    ),
    Target("archive", "install/archive.py"),
)

#: mutmut's exit-code meanings (mutmut.stats.status_by_exit_code), folded.
KILLED, SURVIVED, TIMEOUT, NO_TESTS, OTHER = "killed", "survived", "timeout", "no tests", "other"
EQUIVALENT = "equivalent"


def _status(code: int | None) -> str:
    from mutmut.stats import status_by_exit_code

    status = status_by_exit_code[code]
    return status if status in (KILLED, SURVIVED, TIMEOUT, NO_TESTS) else OTHER


def ensure_mutmut() -> None:
    try:
        import mutmut  # noqa: F401
    except ImportError:
        print("mutmut is missing: installing the [mutation] extra", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "-e", f"{ROOT}[mutation]"],
            check=True,
        )


def check_config() -> None:
    """pyproject's [tool.mutmut] only_mutate must list exactly the target files."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mutmut"]
    wanted = {f"src/{PACKAGE}/{t.path}" for t in TARGETS}
    if set(cfg["only_mutate"]) != wanted:
        sys.exit(
            "pyproject.toml [tool.mutmut] only_mutate must list exactly the files of "
            f"scripts/mutation.py TARGETS: {sorted(wanted)}"
        )


def run_target(target: Target, jobs: int) -> int:
    logs = ROOT / "mutants" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{target.name}.log"
    mutmut = [sys.executable, "-c", "import sys; from mutmut.__main__ import cli; sys.exit(cli())"]
    cmd = ["nice", "-n", "10", *mutmut, "run", "--max-children", str(jobs), *target.globs()]
    print(f"== {target.name}: {target.path} (log: {log.relative_to(ROOT)})", flush=True)
    with open(log, "w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        print(f"   mutmut exited {proc.returncode}; see {log}", flush=True)
    return proc.returncode


def results(target: Target) -> dict[str, int | None]:
    meta = ROOT / "mutants" / "src" / PACKAGE / (target.path + ".meta")
    if not meta.exists():
        return {}
    codes: dict[str, int | None] = json.loads(meta.read_text())["exit_code_by_key"]
    globs = target.globs()
    return {k: v for k, v in codes.items() if any(fnmatch.fnmatchcase(k, g) for g in globs)}


def mutant_diff(name: str) -> str:
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        return get_diff_for_mutant(name)
    finally:
        os.chdir(cwd)


def load_equivalents() -> dict[str, dict[str, str]]:
    if not EQUIVALENT_FILE.exists():
        return {}
    data = tomllib.loads(EQUIVALENT_FILE.read_text())
    return {e["mutant"]: e for e in data.get("equivalent", [])}


@dataclass
class Row:
    name: str
    counts: Counter[str]
    survivors: list[str]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def score(self) -> float:
        denominator = self.total - self.counts[EQUIVALENT]
        detected = self.counts[KILLED] + self.counts[TIMEOUT]
        return 100.0 * detected / denominator if denominator else 100.0


def tabulate(targets: list[Target]) -> tuple[list[Row], list[str]]:
    equivalents = load_equivalents()
    used: set[str] = set()
    problems: list[str] = []
    rows = []
    for target in targets:
        counts: Counter[str] = Counter()
        survivors = []
        for name, code in sorted(results(target).items()):
            status = _status(code)
            entry = equivalents.get(name)
            if entry is not None:
                used.add(name)
                if status in (SURVIVED, NO_TESTS):
                    added = [
                        line[1:].strip()
                        for line in mutant_diff(name).splitlines()
                        if line.startswith("+") and not line.startswith("+++")
                    ]
                    if any(entry["change"] in line for line in added):
                        counts[EQUIVALENT] += 1
                        continue
                    problems.append(f"stale equivalent entry {name}: no longer {entry['change']!r}")
                else:
                    problems.append(f"equivalent entry {name} is {status}: remove the entry")
            counts[status] += 1
            if status in (SURVIVED, NO_TESTS, OTHER):
                survivors.append(name)
        rows.append(Row(target.name, counts, survivors))
    return rows, problems


def render(rows: list[Row], markdown: bool) -> str:
    total = overall(rows)
    head = ("module", "mutants", "killed", "timeout", "survived", "no tests", "equivalent", "score")
    lines = []
    for r in [*rows, total]:
        c = r.counts
        cells = (
            r.name,
            str(r.total),
            str(c[KILLED]),
            str(c[TIMEOUT]),
            str(c[SURVIVED] + c[OTHER]),
            str(c[NO_TESTS]),
            str(c[EQUIVALENT]),
            f"{r.score:.1f} %",
        )
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(cells) + " |" for cells in lines]
        return "\n".join(out)
    widths = [max(len(x) for x in col) for col in zip(head, *lines, strict=True)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join(fmt.format(*cells) for cells in [head, *lines])


def overall(rows: list[Row]) -> Row:
    return Row("overall", sum((r.counts for r in rows), Counter()), [])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", help="module names (default: all)")
    parser.add_argument("--report", action="store_true", help="no run, just the table")
    parser.add_argument("--survivors", action="store_true", help="print each survivor's diff")
    parser.add_argument("--markdown", action="store_true", help="table as markdown")
    parser.add_argument("--jobs", type=int, default=1, help="parallel mutants (default 1)")
    parser.add_argument("--min-score", type=float, default=None, help="fail below this %%")
    args = parser.parse_args()

    by_name = {t.name: t for t in TARGETS}
    unknown = [m for m in args.modules if m not in by_name]
    if unknown:
        parser.error(f"unknown module(s) {unknown}; known: {', '.join(by_name)}")
    targets = [by_name[m] for m in args.modules] if args.modules else list(TARGETS)

    check_config()
    ensure_mutmut()
    failed = []
    if not args.report:
        failed = [t.name for t in targets if run_target(t, args.jobs) != 0]

    rows, problems = tabulate(targets)
    if args.survivors:
        for row in rows:
            for name in row.survivors:
                print(mutant_diff(name), end="\n\n")
    print(render(rows, args.markdown))
    for p in problems:
        print("warning:", p)
    if failed:
        print(f"mutmut failed for {failed}: see mutants/logs/")
        return 2
    score = overall(rows).score
    if args.min_score is not None and score < args.min_score:
        print(f"overall score {score:.1f} % is below {args.min_score} %")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

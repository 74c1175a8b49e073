"""``ironclaw security profile``: AppArmor profile / SELinux module for a VM's jail."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError, IronclawError
from ..security.apparmor import generate_apparmor_profile, profile_name
from ..security.facts import jail_facts
from ..security.selinux import JAILER_LABEL, generate_selinux_module, module_name
from ..vm.binaries import find_firecracker
from .common import ConfigFileOption, IdOption, fail, handle_errors, load_toml, stderr
from .summaries import help_text
from .vm import build_config

app = typer.Typer(
    help=help_text("security"),
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)

PROFILE_HELP = (
    "Print the AppArmor profile (--apparmor) or SELinux module (--selinux) confining a VM "
    "with this configuration: only its jail's files, /dev/kvm, /dev/net/tun with "
    "networking, Unix sockets for the API and vsock; no IP sockets, ptrace or mount.\n\n"
    "Examples:\n\n"
    "ironclaw security profile --apparmor --id web-1 > /etc/apparmor.d/ironclaw-web-1\n\n"
    "apparmor_parser -r /etc/apparmor.d/ironclaw-web-1\n\n"
    "ironclaw security profile --selinux --config vm.toml --output-dir ./policy\n\n"
    "Then start the VM with --apparmor-profile ironclaw-web-1 (or --selinux-label "
    f"{JAILER_LABEL}); the start is refused where that LSM is not active."
)


@app.command(name="profile", help=PROFILE_HELP)
def profile(
    apparmor: Annotated[bool, typer.Option("--apparmor", help="AppArmor profile.")] = False,
    selinux: Annotated[bool, typer.Option("--selinux", help="SELinux module (.te).")] = False,
    file_contexts: Annotated[
        bool, typer.Option("--file-contexts", help="With --selinux: print the .fc instead.")
    ] = False,
    vm_id: IdOption = None,
    config_file: ConfigFileOption = None,
    enable_networking: Annotated[
        bool | None, typer.Option("--networking/--no-networking", help="VM has a tap device.")
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option("--output-dir", help="Write the file(s) here instead.")
    ] = None,
) -> None:
    if apparmor == selinux:
        fail("choose one of --apparmor or --selinux")
    if file_contexts and not selinux:
        fail("--file-contexts goes with --selinux")
    overrides: dict[str, Any] = {"vm_id": vm_id, "enable_networking": enable_networking}
    with handle_errors():
        config, _ = build_config(config_file=config_file, overrides=overrides, probe=None)
        if vm_id is None and (config_file is None or "vm_id" not in load_toml(config_file)):
            fail("a profile is for one VM: give --id ID (or vm_id in --config)")
        jc = config.jailer_config()
        explicit = jc.exec_file if "exec_file" in jc.model_fields_set else None
        try:
            exec_file = find_firecracker(explicit)
        except IronclawError:
            exec_file = jc.exec_file  # not installed here: name the configured binary
        facts = jail_facts(config, exec_file=exec_file)
        if apparmor:
            files = {profile_name(facts): generate_apparmor_profile(facts)}
        else:
            te, fc = generate_selinux_module(facts)
            name = module_name(facts)
            files = {f"{name}.te": te, f"{name}.fc": fc}
        if output_dir is None:
            texts = list(files.values())
            typer.echo(texts[-1] if file_contexts else texts[0], nl=False)
            return
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
            for filename, text in files.items():
                (output_dir / filename).write_text(text)
        except OSError as exc:
            raise ConfigError(f"cannot write to --output-dir {output_dir}: {exc}") from None
    for filename in files:
        stderr.print(f"wrote {output_dir / filename}")

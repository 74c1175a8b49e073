"""Stand-in for Firecracker (v1.0.0), for unit tests: the API calls the orchestrator makes.

Started by the stand-in jailer with its working directory as the jail's root: every path
the API gets is jail-relative and resolved there, so an unstaged kernel or disk is refused
with 400 as by the real one. Each request is appended to ``requests`` (``standin.json``)
as one JSON line, and each run to ``"spawns"``. ``"fail"`` makes it fail at a chosen step:
``exit-before-socket``, ``hang-before-socket``, ``die-after-ready`` (exits after answering
the first ``GET /``), ``api-400:<METHOD> <path>``. After ``InstanceStart``,
``"after_start": "exit:N"`` exits with N; ``SendCtrlAltDel`` makes it exit 0 (the guest
reboots), unless ``"ignore_ctrl_alt_del"``.
"""

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

state = {"state": "Not started"}


def jail_path(value: object) -> Path:
    return Path.cwd() / str(value).lstrip("/")


def answer(ctl: dict, vm_id: str, method: str, path: str, body: dict) -> tuple[int, dict]:
    """(status, JSON body) for one request; also decides to exit afterwards."""
    if ctl.get("fail") == f"api-400:{method} {path}":
        return 400, {"fault_message": f"stand-in: {method} {path} refused (standin.json)"}
    if (method, path) == ("GET", "/"):
        return 200, {"id": vm_id, "state": state["state"], "vmm_version": "1.0.0",
                     "app_name": "Firecracker"}  # fmt: skip
    if (method, path) == ("PUT", "/machine-config"):
        ok = all(isinstance(body.get(k), int) for k in ("vcpu_count", "mem_size_mib"))
        return (204, {}) if ok else (400, {"fault_message": "invalid machine config"})
    if (method, path) == ("PUT", "/boot-source"):
        kernel = jail_path(body.get("kernel_image_path"))
        if not kernel.is_file():
            return 400, {"fault_message": f"Cannot open kernel image: {kernel}"}
        return 204, {}
    if method == "PUT" and path.startswith("/drives/"):
        if not jail_path(body.get("path_on_host")).is_file():
            return 400, {"fault_message": "Unable to open the block device backing file"}
        return 204, {}
    if method == "PUT" and (path.startswith("/network-interfaces/") or path == "/vsock"):
        return 204, {}
    if (method, path) == ("PATCH", "/vm") and body.get("state") in ("Paused", "Resumed"):
        state["state"] = "Paused" if body["state"] == "Paused" else "Running"
        return 204, {}
    if (method, path) == ("PUT", "/actions"):
        action = body.get("action_type")
        if action == "InstanceStart" and state["state"] == "Not started":
            state["state"] = "Running"
            return 204, {}
        if action == "SendCtrlAltDel" and state["state"] == "Running":
            return 204, {}
    return 400, {"fault_message": f"stand-in does not support {method} {path} {body}"}


async def serve(sock: Path, ctl: dict, vm_id: str) -> None:
    done = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while not reader.at_eof():
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                break
            lines = head.decode().split("\r\n")
            method, path, _ = lines[0].split(" ")
            length = next(
                (int(h.split(":")[1]) for h in lines if h.lower().startswith("content-length")), 0
            )
            body = json.loads(await reader.readexactly(length)) if length else {}
            with open(ctl["requests"], "a") as log:
                log.write(json.dumps({"method": method, "path": path, "body": body}) + "\n")
            status, payload = answer(ctl, vm_id, method, path, body)
            data = json.dumps(payload).encode() if payload else b""
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data
            )
            await writer.drain()
            if ctl.get("fail") == "die-after-ready":
                os._exit(1)
            action = body.get("action_type") if status == 204 else None
            after = str(ctl.get("after_start", ""))
            if action == "InstanceStart" and after.startswith("exit:"):
                done.set_result(int(after[5:]))
            if action == "SendCtrlAltDel" and not ctl.get("ignore_ctrl_alt_del"):
                done.set_result(0)
        writer.close()

    server = await asyncio.start_unix_server(handle, path=str(sock))
    async with server:
        code = await done
    print(f"stand-in firecracker: exiting with {code}", flush=True)
    os._exit(code)


def main() -> None:
    args = sys.argv[1:]
    if args == ["--version"]:
        print("Firecracker v1.0.0")
        return
    # Jailed: the jailer passes the control file; unjailed, it sits next to this file.
    control = os.environ.get("STANDIN_CONTROL") or Path(__file__).with_name("standin.json")
    ctl = json.loads(Path(control).read_text())
    if ctl.get("spawns"):
        with open(ctl["spawns"], "a") as log:
            line = {"program": "firecracker", "pid": os.getpid(), "argv": sys.argv[1:]}
            log.write(json.dumps(line) + "\n")
    opts: dict[str, str] = {}
    while args:
        flag = args.pop(0)
        if flag in ("--id", "--api-sock", "--level", "--seccomp-filter") and args:
            opts[flag] = args.pop(0)
        elif flag != "--no-seccomp":
            sys.exit(f"Arguments parsing error: Found argument '{flag}' which wasn't expected")
    print(f"stand-in firecracker {opts.get('--id')} started", flush=True)
    if ctl.get("fail") == "exit-before-socket":
        print("Error: stand-in firecracker failed before its socket", flush=True)
        sys.exit(1)
    if ctl.get("fail") == "hang-before-socket":
        while True:
            signal.pause()
    asyncio.run(serve(jail_path(opts["--api-sock"]), ctl, opts.get("--id", "")))


if __name__ == "__main__":
    main()

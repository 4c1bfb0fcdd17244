"""A deployment's processes: command lines for Flower's ``flower-superlink`` and
``flower-supernode`` (TLS on), the Flower app directory that ``flwr run`` submits, the
``FLWR_HOME`` connection file of ``flwr run``, and process-tree helpers.

The Flower app (a FAB) holds only a ``pyproject.toml`` (its run config) and a one-line module
importing :mod:`inference.federated.app`: the code itself is the glioforecast package installed
at the coordinator and at every site, so Flower's runtime dependency installation is switched
off (nothing is downloaded at run time).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from dicom_node.ports import free_port
from inference.federated.certs import NodeKey, check_certificates

APP_MODULE = "glioforecast_federated_app"
CONNECTION = "glioforecast"
#: the SuperLink serves its Fleet, Control and runtime APIs on one HTTPS port (Flower >= 1.41)
DEFAULT_SUPERLINK_HOST = "0.0.0.0"
DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_SUPERNODE_PORT = 9094


def flower_bin(name: str) -> str:
    """Flower's console script next to this interpreter (the venv's), else the bare name."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def process_env(
    flwr_home: str | Path | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment of a Flower process: this venv's bin first on PATH (Flower starts its
    ``flower-superexec`` helpers by name), ``FLWR_HOME`` when given."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def superlink_command(
    certs: str | Path | None,
    *,
    host: str = DEFAULT_SUPERLINK_HOST,
    port: int = DEFAULT_SUPERLINK_PORT,
    database: str | None = None,
    supernode_auth: bool = False,
    extra: Sequence[str] = (),
) -> list[str]:
    """``flower-superlink`` with TLS (``certs``: a directory of ``glioforecast federate certs``;
    ``None``: insecure, for experiments only); with ``supernode_auth`` only SuperNodes whose
    public key was registered (:func:`register_command`) can join."""
    cmd = [flower_bin("flower-superlink")]
    if certs is None:
        cmd.append("--insecure")
    else:
        files = check_certificates(certs, server=True)
        cmd += [
            "--ssl-ca-certfile", str(files.ca_cert),
            "--ssl-certfile", str(files.server_cert),
            "--ssl-keyfile", str(files.server_key),
        ]  # fmt: skip
    cmd += [
        "--host", host,
        "--port", str(port),
        "--disable-runtime-dependency-installation",
    ]  # fmt: skip
    if database:
        cmd += ["--database", database]
    if supernode_auth:
        cmd.append("--enable-supernode-auth")
    return cmd + list(extra)


def node_config_string(values: Mapping[str, Any]) -> str:
    """Flower's ``--node-config`` syntax: ``key="value" key=3``."""
    parts = []
    for k, v in values.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            text = str(v).replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'{k}="{text}"')
    return " ".join(parts)


def supernode_command(
    superlink: str,
    ca_cert: str | Path | None,
    data: Sequence[str | Path],
    *,
    site: str = "",
    device: str = "cpu",
    threads: int = 0,
    runtime_host: str = "127.0.0.1",
    runtime_port: int = DEFAULT_SUPERNODE_PORT,
    auth_key: str | Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """``flower-supernode`` for one site, verifying the SuperLink with ``ca_cert``
    (``None``: insecure) and, with ``auth_key`` (its private key of ``federate node-key``),
    proving its identity to a SuperLink that authenticates SuperNodes and its site name to a
    coordinator that checks ``site-keys``."""
    cmd = [flower_bin("flower-supernode"), "--superlink", superlink]
    if ca_cert is None:
        cmd.append("--insecure")
    else:
        cmd += ["--root-certificates", str(ca_cert)]
    node: dict[str, Any] = {"data-path": ",".join(str(Path(d).resolve()) for d in data)}
    if site:
        node["site-name"] = site
    if auth_key is not None:
        # one key for both: the SuperLink admits the node by it, the coordinator's site-keys
        # check binds the site name to it
        cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
        node["site-key"] = str(Path(auth_key).resolve())
    node["device"] = device
    node["threads"] = threads
    cmd += [
        "--node-config", node_config_string(node),
        "--host", runtime_host,
        "--port", str(runtime_port),
    ]  # fmt: skip
    return cmd + list(extra)


def write_app(directory: str | Path, run_config: Mapping[str, Any]) -> Path:
    """The Flower app directory ``flwr run`` builds its FAB from."""
    import tomli_w

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    from dicom_node import __version__

    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": "glioforecast-federated",
            "version": "1.0.0",
            "description": f"glioforecast {__version__} federated training (research use only)",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "glioforecast",
                    "components": {
                        "serverapp": f"{APP_MODULE}:server_app",
                        "clientapp": f"{APP_MODULE}:client_app",
                    },
                    "config": dict(run_config),
                }
            }
        },
    }
    (d / "pyproject.toml").write_text(tomli_w.dumps(project), encoding="utf-8")
    (d / f"{APP_MODULE}.py").write_text(
        '"""glioforecast federated training: the apps live in the installed package."""\n\n'
        "from inference.federated.app import client_app, server_app\n\n"
        '__all__ = ["client_app", "server_app"]\n',
        encoding="utf-8",
    )
    return d


def write_connection(
    flwr_home: str | Path, control_address: str, ca_cert: str | Path | None
) -> Path:
    """``FLWR_HOME/config.toml`` naming the SuperLink's Control API for ``flwr run``."""
    import tomli_w

    home = Path(flwr_home)
    home.mkdir(parents=True, exist_ok=True)
    conn: dict[str, Any] = {"address": control_address}
    if ca_cert is None:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(Path(ca_cert).resolve())
    path = home / "config.toml"
    path.write_text(
        tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}), encoding="utf-8"
    )
    return path


def register_command(
    public_key: str | Path, name: str | None = None, *, json_output: bool = False
) -> list[str]:
    """``flwr supernode register``: the coordinator admits a site's SuperNode by its public key
    (through the SuperLink's Control API, named in ``FLWR_HOME`` by :func:`write_connection`);
    ``name`` is stored with the node at the SuperLink, ``json_output`` makes Flower print the
    new node's ID as JSON."""
    cmd = [
        flower_bin("flwr"),
        "supernode",
        "register",
        str(Path(public_key).resolve()),
        CONNECTION,
    ]
    if name:
        cmd += ["--name", name]
    if json_output:
        cmd += ["--format", "json"]
    return cmd


def flwr_run_command(
    app_dir: str | Path,
    overrides: Sequence[str] = (),
    stream: bool = True,
    *,
    json_output: bool = False,
) -> list[str]:
    """``flwr run`` of the app; ``json_output``: Flower prints the run's ID as JSON."""
    cmd = [flower_bin("flwr"), "run", str(app_dir), CONNECTION]
    for o in overrides:
        cmd += ["--run-config", o]
    if stream:
        cmd.append("--stream")
    if json_output:
        cmd += ["--format", "json"]
    return cmd


def flwr_log_command(run_id: int | str) -> list[str]:
    """``flwr log RUN_ID --stream``: follow a run's log until the run ends."""
    return [flower_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"]


def flwr_stop_command(run_id: int | str, *, json_output: bool = False) -> list[str]:
    """``flwr stop RUN_ID``: the SuperLink stops the run (its ServerApp); ``json_output``: Flower
    says whether it did as JSON (exit 0 either way)."""
    cmd = [flower_bin("flwr"), "stop", str(run_id), CONNECTION]
    return [*cmd, "--format", "json"] if json_output else cmd


# ------------------------------------------------------------------------------------------
# process trees


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``), children first."""
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        kids: list[int] = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
        out += kids
        todo += kids
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to ``pid`` and all its descendants (found before the first signal, so
    detached helpers, which Flower starts in their own sessions, are included)."""
    victims = [pid, *descendants(pid)]
    for p in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, sig)
    return victims


def processes_in(directory: str | Path) -> list[int]:
    """Live processes (other than this one) whose working directory is ``directory``."""
    target = Path(directory).resolve()
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            if Path(os.readlink(proc / "cwd")) == target:
                out.append(int(proc.name))
    return out


def wait_for_port(host: str, port: int, timeout: float, proc: Any = None) -> None:
    """Wait until ``host:port`` accepts TCP connections (a started server is listening);
    raises when ``timeout`` passes or ``proc`` (a Popen) exits first."""
    import socket

    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"expected a server on {host}:{port}, found its process exited ({proc.returncode})"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"expected a server listening on {host}:{port} within {timeout:.0f} s, found none"
            )
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------
# a whole deployment on one machine (tests, benchmarks, demos)


class Loopback:
    """A SuperLink and one SuperNode per site as real processes on localhost, TLS on
    (certificates made in ``workdir/certs``), each process logging to ``workdir/<name>.log``.
    With ``supernode_auth`` every site gets a key pair (``workdir/keys``) that the coordinator
    registers before the SuperNodes start, and the SuperLink admits registered SuperNodes only."""

    def __init__(
        self,
        workdir: str | Path,
        sites: Mapping[str, Sequence[str | Path]],
        *,
        threads: int = 1,
        site_filter: bool = True,
        supernode_auth: bool = False,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.sites = dict(sites)
        self.threads = threads
        self.site_filter = site_filter
        self.supernode_auth = supernode_auth
        self.home = self.workdir / "flwr-home"
        self.certs = self.workdir / "certs"
        self.keys = self.workdir / "keys"
        self.port = 0
        self.superlink: Any = None
        self.nodes: dict[str, Any] = {}
        self._files: list[Any] = []

    def log(self, name: str) -> Path:
        return self.workdir / f"{name}.log"

    def _start(self, name: str, cmd: Sequence[str]) -> Any:
        import subprocess

        fh = self.log(name).open("w")
        self._files.append(fh)
        return subprocess.Popen(
            list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=process_env(self.home),
            cwd=self.workdir,
        )  # fmt: skip

    def start(self, timeout: float = 120.0) -> Loopback:
        from inference.federated.certs import make_certificates, make_node_key

        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.certs / "ca.crt").is_file():
            make_certificates(self.certs, hosts=["localhost"], ips=["127.0.0.1"])
        self.port = free_port()
        self.superlink = self._start(
            "superlink",
            superlink_command(
                self.certs, host="127.0.0.1", port=self.port, supernode_auth=self.supernode_auth
            ),
        )
        wait_for_port("127.0.0.1", self.port, timeout, self.superlink)
        write_connection(self.home, f"localhost:{self.port}", self.certs / "ca.crt")
        for name, data in self.sites.items():
            key = None
            if self.supernode_auth:
                key = self.register(make_node_key(self.keys, name, overwrite=True), timeout)
            self.start_node(name, data, key, site=name if self.site_filter else "")
        return self

    def register(self, pair: NodeKey, timeout: float = 120.0) -> Path:
        """Register a SuperNode key pair with the SuperLink; its private key."""
        import subprocess

        registered = subprocess.run(
            register_command(pair.public_key), capture_output=True, text=True,
            env=process_env(self.home), cwd=self.workdir, timeout=timeout,
        )  # fmt: skip
        if registered.returncode != 0:
            raise RuntimeError(
                f"registering the SuperNode key {pair.public_key}: expected exit 0, found "
                f"{registered.returncode}: {(registered.stdout + registered.stderr)[-800:]}"
            )
        return pair.private_key

    def start_node(
        self, name: str, data: Sequence[str | Path], auth_key: Path | None, site: str = ""
    ) -> Any:
        """One more SuperNode (logging to ``supernode-<name>.log``)."""
        self.nodes[name] = self._start(
            f"supernode-{name}",
            supernode_command(
                f"localhost:{self.port}", self.certs / "ca.crt", data, site=site,
                threads=self.threads, runtime_port=free_port(), auth_key=auth_key,
            ),
        )  # fmt: skip
        return self.nodes[name]

    def submit(self, run_config: Mapping[str, Any], name: str = "run") -> Any:
        """``flwr run --stream`` of the app with ``run_config`` (a Popen logging to
        ``<name>.log``)."""
        app = write_app(self.workdir / "app", run_config)
        return self._start(name, flwr_run_command(app))

    def run(self, run_config: Mapping[str, Any], timeout: float) -> int:
        """Submit and wait; the return code of ``flwr run`` (0 also when the ServerApp failed:
        check the model directory)."""
        proc = self.submit(run_config)
        return int(proc.wait(timeout=timeout))

    def kill_site(self, name: str) -> list[int]:
        return kill_tree(self.nodes[name].pid)

    def stop(self) -> None:
        procs = [*self.nodes.values(), self.superlink]
        for p in procs:
            if p is not None and p.poll() is None:
                kill_tree(p.pid, signal.SIGTERM)
        for p in procs:
            if p is None:
                continue
            try:
                p.wait(timeout=10)
            except Exception:
                kill_tree(p.pid)
                p.wait(timeout=10)
        # helpers of a SuperNode that exited on its own (a refused one) outlive it, detached:
        # every process started here runs in the work directory
        deadline = time.monotonic() + 10.0
        while (strays := processes_in(self.workdir)) and time.monotonic() < deadline:
            for pid in strays:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        for fh in self._files:
            fh.close()

    def __enter__(self) -> Loopback:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

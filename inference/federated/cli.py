"""``glioforecast federate certs|node-key|register|superlink|supernode|check-data|run|simulate``.

- ``certs``: a CA and the SuperLink's certificate (:mod:`inference.federated.certs`);
- ``node-key`` (a site) and ``register`` (the coordinator): SuperNode authentication, a key
  pair per site whose public key the coordinator registers with ``flwr supernode register``;
  a SuperLink started with ``--supernode-auth`` then admits registered SuperNodes only;
- ``superlink`` / ``supernode``: thin wrappers that run Flower's ``flower-superlink`` /
  ``flower-supernode`` with TLS and this project's settings (the exact Flower command is logged,
  ``--print`` shows it without running it); ``supernode`` first reads the site's patient list
  and refuses to start when the table or the files behind it are unusable;
- ``check-data``: reads every patient of a site folder as training will and lists the
  unreadable ones with their reasons (run it before joining a federation);
- ``run``: submits the federated training (``flwr run --stream``) to a SuperLink and follows it;
  with ``--site-keys`` each site must prove its site name with its key
  (:mod:`inference.federated.site_identity`); ``run`` and ``simulate`` refuse an ``--out`` that
  holds a model already unless ``--overwrite``, before any round, and go on with a run stopped
  part-way with ``--resume`` (:mod:`inference.federated.checkpoint`);
- ``simulate``: the same apps on one machine, virtual sites reading one cohort folder: in this
  process (``--engine local``, :mod:`inference.federated.simulation`) or in Flower's simulation
  runtime (``--engine ray``).
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dicom_node.errors import GlioforecastError

log = logging.getLogger(__name__)

EXIT_FAILED = 2


def _fail(command: str, exc: Exception) -> int:
    sys.stderr.write(f"glioforecast federate {command}: {exc}\n")
    return EXIT_FAILED


def _exec(
    cmd: list[str], show: bool, env: dict[str, str] | None = None, *, replace: bool = False
) -> int:
    """Run Flower's ``cmd`` (``show``: print it only). With ``replace`` this process becomes
    Flower's (``execvpe``): a service manager's SIGTERM or SIGINT to the wrapper then reaches
    ``flower-superlink`` / ``flower-supernode`` itself, where a child process used to be left
    running, orphaned, when the wrapper was stopped."""
    log.info("running %s", shlex.join(cmd))
    if show:
        print(shlex.join(cmd))
        return 0
    if replace:
        for handler in logging.getLogger().handlers:
            handler.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvpe(cmd[0], cmd, env if env is not None else dict(os.environ))
    return subprocess.call(cmd, env=env)


def cmd_certs(args: argparse.Namespace) -> int:
    from inference.federated.certs import certificate_names, make_certificates

    hosts, ips = list(args.host or []), list(args.ip or [])
    # the defaults are said aloud: a certificate valid for this machine only is of no use to
    # the sites, and one that also names 127.0.0.1 should not be a surprise
    if not hosts:
        hosts = ["localhost"]
        print("no --host given: the certificate names localhost")
    if not ips:
        ips = ["127.0.0.1"]
        print("no --ip given: the certificate names 127.0.0.1")
    try:
        files = make_certificates(
            args.out, hosts=hosts, ips=ips, days=args.days, overwrite=args.overwrite
        )
    except GlioforecastError as exc:
        return _fail("certs", exc)
    print(f"SuperLink certificate valid for: {', '.join(certificate_names(files.server_cert))}")
    print(f"CA certificate (give it to every site): {files.ca_cert}")
    print(f"CA key (keep it on the coordinator):     {files.ca_key}")
    print(f"SuperLink certificate and key:          {files.server_cert}, {files.server_key}")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    from inference.federated.certs import certificate_names, certificate_set
    from inference.federated.deploy import process_env, superlink_command

    try:
        cmd = superlink_command(
            None if args.insecure else args.certs, host=args.host, port=args.port,
            database=args.database, supernode_auth=args.supernode_auth,
        )  # fmt: skip
    except GlioforecastError as exc:
        return _fail("superlink", exc)
    if not args.insecure:
        # on stderr: with --print, stdout is the command alone
        names = certificate_names(certificate_set(args.certs).server_cert)
        sys.stderr.write(f"SuperLink certificate valid for: {', '.join(names)}\n")
    return _exec(cmd, args.print, process_env(args.flwr_home), replace=True)


def cmd_supernode(args: argparse.Namespace) -> int:
    from inference.data import DEFAULT_SURVIVAL_CLASSES
    from inference.federated.certs import check_ca_certificate
    from inference.federated.config import NodeConfig
    from inference.federated.deploy import process_env, supernode_command
    from inference.federated.local import site_patients

    if not args.insecure and args.ca_cert is None:
        return _fail(
            "supernode", ValueError("expected --ca-cert FILE (or --insecure), found neither")
        )
    # the survival classes are checked here as training checks them each round (against the
    # model's): a table the rounds would refuse is refused before the SuperNode starts
    classes = args.survival_classes or DEFAULT_SURVIVAL_CLASSES
    try:
        if not args.insecure:
            check_ca_certificate(args.ca_cert)
        patients = site_patients(NodeConfig(tuple(args.data), args.site or ""), classes)
    except GlioforecastError as exc:
        return _fail("supernode", exc)
    log.info("site %s: %d patients", args.site or "(all of --data)", len(patients))
    if args.auth_key is not None and not Path(args.auth_key).is_file():
        return _fail(
            "supernode",
            ValueError(
                f"--auth-key: expected the site's private key file, found no {args.auth_key}"
            ),
        )
    cmd = supernode_command(
        args.superlink, None if args.insecure else args.ca_cert, args.data, site=args.site or "",
        device=args.device, threads=args.threads, runtime_port=args.port, auth_key=args.auth_key,
    )  # fmt: skip
    return _exec(cmd, args.print, process_env(args.flwr_home), replace=True)


def cmd_node_key(args: argparse.Namespace) -> int:
    from inference.federated.certs import make_node_key

    try:
        key = make_node_key(args.out, args.name, overwrite=args.overwrite)
    except GlioforecastError as exc:
        return _fail("node-key", exc)
    print(f"private key (keep it at the site; supernode --auth-key): {key.private_key}")
    print(f"public key (send it to the coordinator; federate register): {key.public_key}")
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from inference.federated.deploy import process_env, register_command, write_connection

    if not Path(args.public_key).is_file():
        return _fail(
            "register",
            ValueError(f"--public-key: expected a site's .pub file, found no {args.public_key}"),
        )
    if not args.insecure and args.ca_cert is None:
        return _fail(
            "register", ValueError("expected --ca-cert FILE (or --insecure), found neither")
        )
    if args.flwr_home:
        home = Path(args.flwr_home)
        write_connection(home, args.superlink, None if args.insecure else args.ca_cert)
        return _exec(register_command(args.public_key), args.print, process_env(home))
    with tempfile.TemporaryDirectory(prefix="gf-flwr-") as tmp:
        write_connection(Path(tmp), args.superlink, None if args.insecure else args.ca_cert)
        return _exec(register_command(args.public_key), args.print, process_env(Path(tmp)))


def _class_list(text: str) -> tuple[str, ...]:
    classes = tuple(t.strip() for t in text.split(",") if t.strip())
    if not classes:
        raise argparse.ArgumentTypeError(f"expected comma-separated class names, found {text!r}")
    return classes


def cmd_check_data(args: argparse.Namespace) -> int:
    from inference.data import DEFAULT_SURVIVAL_CLASSES
    from inference.federated.config import NodeConfig
    from inference.federated.local import check_site_data

    node = NodeConfig(tuple(args.data), args.site or "")
    classes = args.survival_classes or DEFAULT_SURVIVAL_CLASSES
    try:
        patients, problems = check_site_data(
            node, lambda p: log.info("reading %s", p.patient_id), classes
        )
    except GlioforecastError as exc:
        return _fail("check-data", exc)
    by_source: dict[str, int] = {}
    for p in patients:
        source = "dicom" if p.dicom is not None else "nifti"
        by_source[source] = by_source.get(source, 0) + 1
    sites = sorted({p.site for p in patients})
    counts = ", ".join(f"{n} {source}" for source, n in sorted(by_source.items()))
    print(f"{len(patients)} patients ({counts}), sites {', '.join(sites)}")
    for line in problems:
        print(f"unreadable: {line}")
    if problems:
        print(f"{len(problems)} of {len(patients)} patients cannot be used; fix them or remove "
              "their rows from cohort.csv")  # fmt: skip
        return 1
    print("every patient is readable")
    return 0


def _run_config(args: argparse.Namespace) -> Any:
    from inference.federated.config import RunConfig

    values: dict[str, Any] = {
        "stage": args.stage, "strategy": args.strategy, "proximal_mu": args.proximal_mu,
        "num_server_rounds": args.rounds, "local_epochs": args.local_epochs,
        "learning_rate": args.learning_rate, "batch_size": args.batch_size, "seed": args.seed,
        "preset": args.preset, "out": str(Path(args.out).resolve()), "sites": args.sites or "",
        "min_sites": args.min_sites, "card_metrics": not args.no_card_metrics,
        "overwrite": args.overwrite, "resume": args.resume,
    }  # fmt: skip
    if args.model_yaml:
        values["model_yaml"] = str(Path(args.model_yaml).resolve())
    if args.stage1_dir:
        values["stage1_dir"] = str(Path(args.stage1_dir).resolve())
    if getattr(args, "straggler_timeout", None) is not None:
        values["straggler_timeout"] = args.straggler_timeout
    if getattr(args, "round_timeout", None) is not None:
        values["round_timeout"] = args.round_timeout
    if getattr(args, "wait_for_sites", None) is not None:
        values["wait_for_sites"] = args.wait_for_sites
    if getattr(args, "site_keys", None) is not None:
        from inference.federated.site_identity import check_keys_dir

        check_keys_dir(args.site_keys)
        values["site_keys"] = str(Path(args.site_keys).resolve())
    return RunConfig(**values)


def cmd_run(args: argparse.Namespace) -> int:
    from inference.federated.app import check_out_dir
    from inference.federated.deploy import (
        flwr_run_command,
        process_env,
        write_app,
        write_connection,
    )

    # as supernode and register do: without a CA certificate, `flwr run` used to connect
    # without TLS (config.toml insecure = true) when --insecure was not asked for
    if not args.insecure and args.ca_cert is None:
        return _fail("run", ValueError("expected --ca-cert FILE (or --insecure), found neither"))
    try:
        run = _run_config(args)
        # --run-config overrides are checked here: the SuperLink answers a mistyped key with
        # only "[code: 15] Invalid run configuration."
        run = _with_overrides(run, args.run_config or [])
        check_out_dir(run)
    except GlioforecastError as exc:
        return _fail("run", exc)
    # the app and the connection settings `flwr run` reads; kept only for a --print command
    work = Path(tempfile.mkdtemp(prefix="gf-federate-"))
    home = Path(args.flwr_home) if args.flwr_home else work / "flwr-home"
    out = Path(run.out)
    before = _stamp(out / "federation.json")
    try:
        write_connection(home, args.superlink, None if args.insecure else args.ca_cert)
        app = write_app(work / "app", run.as_flower_config())
        rc = _exec(flwr_run_command(app, args.run_config or []), args.print, process_env(home))
    finally:
        if not args.print:
            shutil.rmtree(work, ignore_errors=True)
    if rc != 0 or args.print:
        return rc
    # `flwr run --stream` exits 0 when the stream ends, whether or not the ServerApp finished;
    # a federation.json older than the run is an earlier run's
    after = _stamp(out / "federation.json")
    if after is None or after == before:
        from inference.federated.checkpoint import describe

        found = "none" if after is None else "only an earlier run's"
        interrupted = describe(run)
        return _fail(
            "run",
            RuntimeError(
                f"expected the global model directory {out} with a federation.json written by "
                f"this run, found {found}: the run ended early (see the run's log above, or "
                "`flwr log <run id>`), or --out is not a path on this machine"
                + (
                    f"; its checkpoint ({interrupted}) lets --resume go on from there"
                    if interrupted
                    else ""
                )
            ),
        )
    print(f"global model directory: {out}")
    return 0


def _stamp(path: Path) -> int | None:
    """``path``'s modification time (ns), ``None`` when absent."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return None


def _with_overrides(run: Any, overrides: list[str]) -> Any:
    """``run`` with ``flwr run --run-config`` overrides applied, parsed as Flower parses them
    and validated as the ServerApp will (an unknown key names the known ones)."""
    from flwr.common.config import parse_config_args

    from inference.federated.config import parse_run_config

    if not overrides:
        return run
    try:
        values = parse_config_args(overrides)
    except Exception as exc:  # Flower's parser raises ValueError or TOML errors
        from dicom_node.errors import ConfigError

        raise ConfigError(
            "--run-config",
            [f"expected 'key=value ...' (TOML values), found {overrides} ({exc})"],
        ) from None
    return parse_run_config({**run.as_flower_config(), **values})


def _check_simulated_sites(run: Any, sites: tuple[str, ...], present: list[str], data: str) -> None:
    """In a simulation every site is known before the run: refuse at once what a deployment
    could only find out by waiting (``wait-for-sites``) or training a round."""
    from dicom_node.errors import ConfigError

    problems = []
    unknown = sorted(set(sites) - set(present))
    if unknown:
        problems.append(
            f"sites: expected sites of {data} ({present}), found {unknown} with no patient there"
        )
    if run.min_sites > len(sites):
        problems.append(
            f"min-sites: expected at most the {len(sites)} site(s) of the simulation "
            f"{list(sites)}, found {run.min_sites}"
        )
    if problems:
        raise ConfigError("federated simulation", problems)


def cmd_simulate(args: argparse.Namespace) -> int:
    import dataclasses

    from inference.data import read_cohort

    try:
        run = _run_config(args)
        run = dataclasses.replace(run, simulation_data=str(Path(args.data).resolve()))
        present = sorted({p.site for p in read_cohort(args.data, survival_classes=None)})
        sites = run.site_list or tuple(present)
        _check_simulated_sites(run, sites, present, args.data)
        from inference.federated.app import check_out_dir

        check_out_dir(run)
    except GlioforecastError as exc:
        return _fail("simulate", exc)
    before = _stamp(Path(run.out) / "federation.json")
    if args.engine == "local":
        from inference.federated.app import show_progress
        from inference.federated.simulation import simulate_local

        show_progress()
        try:
            simulate_local(run, {s: [args.data] for s in sites}, threads=args.threads)
        except GlioforecastError as exc:
            return _fail("simulate", exc)
    else:
        try:
            from flwr.simulation import run_simulation
        except ImportError as exc:  # pragma: no cover - depends on the install
            return _fail("simulate", exc)
        from inference.federated.app import make_client_app, make_server_app

        os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
        run = dataclasses.replace(run, sites=",".join(sites))
        run_simulation(
            server_app=make_server_app(run),
            client_app=make_client_app(run),
            num_supernodes=len(sites),
            backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                            "init_args": {"num_cpus": args.cpus}},
        )  # fmt: skip
    # (Ray's runtime logs a ServerApp's error and returns: only a fresh federation.json says
    # the run finished)
    after = _stamp(Path(run.out) / "federation.json")
    if after is None or after == before:
        found = "none" if after is None else "only an earlier run's"
        return _fail(
            "simulate",
            RuntimeError(f"expected a model directory written by this run at {run.out}, "
                         f"found {found}"),
        )  # fmt: skip
    return 0


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--out", required=True, help="global model directory (written by the coordinator)"
    )
    p.add_argument("--stage", choices=("baseline", "autoencoder", "diffusion"), default="baseline")
    p.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg")
    p.add_argument("--proximal-mu", type=float, default=0.01, help="FedProx mu (default 0.01)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--preset", choices=("tiny", "demo", "fine"), default="tiny")
    p.add_argument("--model-yaml", default=None, help="YAML mapping overriding the preset's fields")
    p.add_argument("--stage1-dir", default=None, help="(diffusion) trained autoencoder directory")
    p.add_argument("--sites", default=None, help="comma-separated site names (default: all)")
    p.add_argument("--min-sites", type=int, default=1, help="fewest replies that make a round")
    p.add_argument("--straggler-timeout", type=float, default=None)
    p.add_argument("--round-timeout", type=float, default=None)
    p.add_argument(
        "--wait-for-sites",
        type=float,
        default=None,
        help="seconds to wait for the sites to connect before the first round (default 120)",
    )
    p.add_argument("--no-card-metrics", action="store_true", help="per-site losses only")
    p.add_argument(
        "--overwrite", action="store_true",
        help="replace a model directory already at --out (refused otherwise, before any round)",
    )  # fmt: skip
    p.add_argument(
        "--resume", action="store_true",
        help="go on with the run interrupted at --out from its last completed round (its "
        "checkpoint; the same training settings, --rounds may be raised)",
    )  # fmt: skip


def register(subparsers: Any) -> None:
    """Add ``federate`` to an argparse sub-parser collection."""
    fed = subparsers.add_parser(
        "federate", help="federated training with Flower (TLS)", description=__doc__
    )
    sub = fed.add_subparsers(dest="federate_command", required=True)

    p = sub.add_parser("certs", help="make a CA and the SuperLink's certificate")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--host", action="append", help="SuperLink host name (repeatable; default localhost)"
    )
    p.add_argument(
        "--ip", action="append", help="SuperLink IP address (repeatable; default 127.0.0.1)"
    )
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_certs)

    p = sub.add_parser("superlink", help="run Flower's SuperLink with TLS (coordinator)")
    p.add_argument("--certs", type=Path, default=None, help="folder made by `federate certs`")
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--port", type=int, default=9092, help="the one HTTPS port of the SuperLink")
    p.add_argument("--database", default=None, help="SQLite state file (default: in memory)")
    p.add_argument("--insecure", action="store_true", help="no TLS (experiments only)")
    p.add_argument(
        "--supernode-auth", action="store_true",
        help="admit only SuperNodes whose public key was registered (`federate register`)",
    )  # fmt: skip
    p.add_argument("--flwr-home", default=None)
    p.add_argument("--print", action="store_true", help="print the Flower command, do not run it")
    p.set_defaults(func=cmd_superlink)

    p = sub.add_parser("node-key", help="make a SuperNode's authentication key pair (a site)")
    p.add_argument("--out", type=Path, required=True, help="folder for NAME.key and NAME.pub")
    p.add_argument("--name", required=True, help="file name of the pair, e.g. the site's name")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_node_key)

    p = sub.add_parser("register", help="admit a site's SuperNode by its public key (coordinator)")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--ca-cert", type=Path, default=None, help="the federation's ca.crt")
    p.add_argument("--public-key", type=Path, required=True, help="the site's NAME.pub")
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--flwr-home", default=None)
    p.add_argument("--print", action="store_true", help="print the Flower command, do not run it")
    p.set_defaults(func=cmd_register)

    p = sub.add_parser("supernode", help="run Flower's SuperNode next to a site's data")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--ca-cert", type=Path, default=None, help="the federation's ca.crt")
    p.add_argument(
        "--data", action="append", required=True, help="the site's folder (NIfTI or DICOM)"
    )
    p.add_argument("--site", default=None, help="site name (filters a multi-site folder)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--port", type=int, default=9094, help="the SuperNode's local runtime port")
    p.add_argument(
        "--survival-classes",
        type=_class_list,
        default=None,
        help="the survival_class values the table may hold, comma-separated (default: "
        "short,intermediate,long, the presets'; give the federation's model.yaml's own)",
    )
    p.add_argument(
        "--auth-key", type=Path, default=None,
        help="the site's private key (`federate node-key`) for a SuperLink that authenticates "
        "SuperNodes",
    )  # fmt: skip
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--flwr-home", default=None)
    p.add_argument("--print", action="store_true")
    p.set_defaults(func=cmd_supernode)

    p = sub.add_parser(
        "check-data",
        help="read every patient of a site folder (NIfTI or DICOM) as training will",
        description="Reads each patient's inputs and follow-up truth from the site's cohort "
        "folder(s) and lists every patient that cannot be used, with the reason. Exit 0 when "
        "all are readable, 1 when some are not, 2 when the folder or table is unusable.",
    )
    p.add_argument(
        "--data", action="append", required=True, help="the site's folder (NIfTI or DICOM)"
    )
    p.add_argument("--site", default=None, help="site name (filters a multi-site folder)")
    p.add_argument(
        "--survival-classes",
        type=_class_list,
        default=None,
        help="the survival_class values the table may hold, comma-separated (default: "
        "short,intermediate,long, the presets'; give a custom model.yaml's own)",
    )
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("run", help="start a federated training on a SuperLink and follow it")
    p.add_argument("--superlink", required=True, help="HOST:PORT of the SuperLink")
    p.add_argument("--ca-cert", type=Path, default=None)
    p.add_argument("--insecure", action="store_true")
    p.add_argument("--flwr-home", default=None)
    p.add_argument("--run-config", action="append", help="extra Flower run config 'key=value ...'")
    p.add_argument(
        "--site-keys", type=Path, default=None,
        help="folder of the sites' public keys named <site>.pub: each site must prove its name "
        "with the matching private key (its supernode --auth-key), or it is left out",
    )  # fmt: skip
    p.add_argument("--print", action="store_true")
    _training_args(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("simulate", help="the same training in Flower's simulation runtime (Ray)")
    p.add_argument("--data", required=True, help="one cohort folder holding every site")
    p.add_argument(
        "--engine",
        choices=("local", "ray"),
        default="local",
        help="local: in-process, sequential (default); ray: Flower's simulation runtime",
    )
    p.add_argument("--cpus", type=int, default=2, help="CPUs Ray may use")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (local engine)")
    _training_args(p)
    p.set_defaults(func=cmd_simulate)

"""``glioforecast federate certs|node-key|register|superlink|supernode|check-data|run|simulate``.

- ``certs``: a CA and the SuperLink's certificate (:mod:`inference.federated.certs`);
- ``node-key`` (a site) and ``register`` (the coordinator): SuperNode authentication, a key
  pair per site whose public key the coordinator registers with ``flwr supernode register``
  (the node ID it gets is printed and, with ``--flwr-home``, kept there by site name);
  a SuperLink started with ``--supernode-auth`` then admits registered SuperNodes only;
- ``superlink`` / ``supernode``: thin wrappers that run Flower's ``flower-superlink`` /
  ``flower-supernode`` with TLS and this project's settings (the exact Flower command is logged,
  ``--print`` shows it without running it); ``supernode`` first reads the site's patient list
  and refuses to start when the table or the files behind it are unusable;
- ``check-data``: reads every patient of a site folder as training will and lists the
  unreadable ones with their reasons (run it before joining a federation);
- ``run``: submits the federated training (``flwr run --format json``, which gives the run's
  ID) to a SuperLink and follows its log (``flwr log --stream``); SIGINT (Ctrl-C) or SIGTERM
  stops the run at the SuperLink (``flwr stop``), or says how to when that fails;
  with ``--site-keys`` each site must prove its site name with its key
  (:mod:`inference.federated.site_identity`); ``run`` and ``simulate`` refuse an ``--out`` that
  holds a model already unless ``--overwrite``, or that another run is writing
  (``federated-run.json``), before any round, and go on with a run stopped part-way with
  ``--resume`` (:mod:`inference.federated.checkpoint`);
- ``simulate``: the same apps on one machine, virtual sites reading one cohort folder: in this
  process (``--engine local``, :mod:`inference.federated.simulation`) or in Flower's simulation
  runtime (``--engine ray``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import shlex
import shutil
import signal
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

    # as supernode, register and run say: without --certs, superlink_command(None) built an
    # --insecure command and reading the certificate names then failed with a TypeError
    if not args.insecure and args.certs is None:
        return _fail("superlink", ValueError("expected --certs DIR (or --insecure), found neither"))
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
    from inference.federated.certs import check_ca_certificate, check_superlink_certificate
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
    # the site's name: the key's file name (`federate node-key --name SITE`) unless given
    site = args.site or Path(args.public_key).name.removesuffix(".pub")
    ca = None if args.insecure else args.ca_cert
    try:
        if ca is not None:
            check_ca_certificate(ca)
            if not args.print:
                check_superlink_certificate(args.superlink, ca)
    except GlioforecastError as exc:
        return _fail("register", exc)

    def register_in(home: Path) -> int:
        write_connection(home, args.superlink, ca)
        if args.print:
            return _exec(register_command(args.public_key, site), True, process_env(home))
        return _register(args, site, home)

    if args.flwr_home:
        return register_in(Path(args.flwr_home))
    with tempfile.TemporaryDirectory(prefix="gf-flwr-") as tmp:
        rc = register_in(Path(tmp))
    if rc == 0 and not args.print:
        print("(without --flwr-home the connection settings are not kept: pass --flwr-home DIR "
              "to keep them for `flwr supernode list` / `unregister`, and the site's node ID "
              "in DIR/" + SITES_FILE + ")")  # fmt: skip
    return rc


#: in a register's --flwr-home: the node ID Flower gave each site's registered key
SITES_FILE = "glioforecast-sites.json"


def _register(args: argparse.Namespace, site: str, home: Path) -> int:
    """Run ``flwr supernode register`` (JSON output), print the node ID the SuperLink gave the
    site and record it in ``home``'s :data:`SITES_FILE` (``flwr supernode list`` shows node IDs
    only)."""
    import datetime
    import json

    from inference.federated.deploy import process_env, register_command

    cmd = register_command(args.public_key, site, json_output=True)
    log.info("running %s", shlex.join(cmd))
    done = subprocess.run(cmd, capture_output=True, text=True, env=process_env(home))
    answer = _flower_json(done.stdout)
    node = answer.get("node-id") if answer else None
    if done.returncode != 0 or not answer or not answer.get("success") or node is None:
        said = (answer or {}).get("error-message") or (done.stdout + done.stderr).strip()
        return _fail(
            "register",
            RuntimeError(f"registering {args.public_key} for site {site}: Flower said: {said}"),
        )
    print(f"site {site}: SuperNode key {args.public_key} registered, node ID {node}")
    if args.flwr_home:
        path = home / SITES_FILE
        try:
            sites = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            sites = {}
        if not isinstance(sites, dict):
            sites = {}
        sites[site] = {
            "node-id": str(node),
            "public-key": str(Path(args.public_key).resolve()),
            "superlink": args.superlink,
            "registered-at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        path.write_text(json.dumps(sites, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"node IDs of the registered sites: {path}")
    return 0


def _flower_json(text: str) -> dict[str, Any] | None:
    """The JSON object a ``flwr ... --format json`` command printed (``None``: none)."""
    import json

    start = text.find("{")
    if start < 0:
        return None
    try:
        value = json.loads(text[start:])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


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
    from inference.federated.app import check_out_dir, claim_out_dir, release_out_dir
    from inference.federated.certs import check_ca_certificate, check_superlink_certificate
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
        # an expired or another federation's ca.crt: Flower says only "Connection to the
        # SuperLink is unavailable"
        if not args.insecure:
            check_ca_certificate(args.ca_cert)
        run = _run_config(args)
        # --run-config overrides are checked here: the SuperLink answers a mistyped key with
        # only "[code: 15] Invalid run configuration."
        run = _with_overrides(run, args.run_config or [])
        check_out_dir(run)
        if not args.insecure and not args.print:
            check_superlink_certificate(args.superlink, args.ca_cert)
    except GlioforecastError as exc:
        return _fail("run", exc)
    # the app and the connection settings `flwr run` reads; kept only for a --print command
    # and for the `flwr stop` command of a run that could not be stopped
    work = Path(tempfile.mkdtemp(prefix="gf-federate-"))
    home = Path(args.flwr_home) if args.flwr_home else work / "flwr-home"
    out = Path(run.out)
    if args.print:
        write_connection(home, args.superlink, None if args.insecure else args.ca_cert)
        app = write_app(work / "app", run.as_flower_config())
        return _exec(flwr_run_command(app, args.run_config or []), True, process_env(home))
    before = _stamp(out / "federation.json")
    keep = False
    # a second run with this --out is refused until this one ends (both used to write it)
    try:
        claim_out_dir(run, "run")
    except GlioforecastError as exc:
        shutil.rmtree(work, ignore_errors=True)
        return _fail("run", exc)
    try:
        write_connection(home, args.superlink, None if args.insecure else args.ca_cert)
        app = write_app(work / "app", run.as_flower_config())
        outcome = _submit_and_follow(run, app, args.run_config or [], process_env(home))
        if outcome.signal is not None and not outcome.finished:
            # the connection settings of the `flwr stop` command it gives are kept
            keep = not outcome.stopped and not args.flwr_home
            return _interrupted(run, outcome, home)
        if outcome.run_id is None:
            return _fail(
                "run",
                RuntimeError(f"submitting the run to the SuperLink {args.superlink} failed: "
                             f"{outcome.detail}{_resume_hint(run)}"),
            )  # fmt: skip
        if outcome.rc != 0:
            # the SuperLink gone, say: the stream's error is Flower's, printed above
            return _fail(
                "run",
                RuntimeError(f"following run {outcome.run_id} failed (exit {outcome.rc}; "
                             f"Flower's message above){_resume_hint(run)}"),
            )  # fmt: skip
    finally:
        release_out_dir(run)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    # `flwr log --stream` exits 0 when the stream ends, whether or not the ServerApp finished;
    # a federation.json older than the run is an earlier run's
    after = _stamp(out / "federation.json")
    if after is None or after == before:
        found = "none" if after is None else "only an earlier run's"
        return _fail(
            "run",
            RuntimeError(
                f"expected the global model directory {out} with a federation.json written by "
                f"this run, found {found}: the run ended early (see the run's log above, or "
                f"`flwr log {outcome.run_id}`), or --out is not a path on this machine"
                + _resume_hint(run)
            ),
        )
    print(f"global model directory: {out}")
    return 0


def _resume_hint(run: Any) -> str:
    """The words that name the checkpoint at the run's ``out`` and ``--resume`` ("" when it
    holds none)."""
    from inference.federated.checkpoint import describe

    interrupted = describe(run)
    if not interrupted:
        return ""
    return f"; its checkpoint ({interrupted}) lets --resume go on from there"


@dataclasses.dataclass
class _Outcome:
    """How a submitted run ended for `federate run`."""

    rc: int
    run_id: str | None = None
    signal: int | None = None  # the signal that interrupted `federate run`
    stopped: bool = False  # `flwr stop` stopped the run
    finished: bool = False  # the run had ended when the signal came: nothing to stop
    detail: str = ""  # what Flower said when submitting or stopping failed


#: seconds `flwr stop` may take
STOP_TIMEOUT_S = 60.0


def _submit_and_follow(run: Any, app: Path, overrides: list[str], env: dict[str, str]) -> _Outcome:
    """Submit the app (``flwr run --format json``, which prints the run's ID), follow the run's
    log (``flwr log --stream``) until it ends, and stop the run (``flwr stop``) when SIGINT or
    SIGTERM comes. `flwr run --stream` used to be run directly: Ctrl-C ended only its log
    stream, and the run went on at the SuperLink and wrote its model minutes later.

    Flower's processes get sessions of their own so that the terminal's Ctrl-C reaches this
    process alone. A signal while the run is being submitted is acted on once the run has an
    ID; a second one abandons the submission."""
    from inference.federated.app import update_out_dir_claim
    from inference.federated.deploy import flwr_log_command, flwr_run_command, flwr_stop_command

    received: list[int] = []
    procs: dict[str, subprocess.Popen[Any]] = {}

    def on_signal(signum: int, _frame: Any) -> None:
        received.append(signum)
        target = procs.get("follow")
        if target is None and len(received) > 1:
            target = procs.get("submit")
        if target is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(target.pid, signal.SIGTERM)
        elif len(received) == 1:
            sys.stderr.write(f"glioforecast federate run: {signal.Signals(signum).name}: the run "
                             "is stopped once the SuperLink has accepted it (again: give up "
                             "waiting)\n")  # fmt: skip

    previous: dict[int, Any] = {}
    with contextlib.suppress(ValueError):  # not the main thread: signals are not ours to take
        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        cmd = flwr_run_command(app, overrides, stream=False, json_output=True)
        log.info("running %s", shlex.join(cmd))
        procs["submit"] = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,
        )  # fmt: skip
        said, err = procs["submit"].communicate()
        submitted = procs.pop("submit")
        answer = _flower_json(said)
        run_id = answer.get("run-id") if answer else None
        if not answer or not answer.get("success") or not run_id:
            if len(received) > 1:
                return _Outcome(128 + received[0], signal=received[0],
                                detail="given up while the run was being submitted")  # fmt: skip
            detail = (answer or {}).get("error-message") or (said + err).strip()
            return _Outcome(submitted.returncode or 1, detail=str(detail).strip())
        run_id = str(run_id)
        update_out_dir_claim(run, run_id=run_id)
        print(f"run {run_id} started at the SuperLink (Ctrl-C stops it); its log follows",
              flush=True)  # fmt: skip
        rc = 0
        if not received:
            cmd = flwr_log_command(run_id)
            log.info("running %s", shlex.join(cmd))
            procs["follow"] = subprocess.Popen(cmd, env=env, start_new_session=True)
            if received:  # came while it started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(procs["follow"].pid, signal.SIGTERM)
            rc = procs["follow"].wait()
            procs.pop("follow")
        if not received:
            return _Outcome(rc, run_id=run_id)
        cmd = flwr_stop_command(run_id, json_output=True)
        log.info("running %s", shlex.join(cmd))
        try:
            stop = subprocess.run(cmd, capture_output=True, text=True, env=env,
                                  start_new_session=True, timeout=STOP_TIMEOUT_S)  # fmt: skip
            answer = _flower_json(stop.stdout)
            stopped = stop.returncode == 0 and bool(answer and answer.get("success"))
            detail = str((answer or {}).get("error-message") or (stop.stdout + stop.stderr))
            detail = " ".join(detail.split())
        except subprocess.TimeoutExpired:
            stopped, detail = False, f"no answer within {STOP_TIMEOUT_S:.0f} s"
        except OSError as exc:
            stopped, detail = False, str(exc)
        if not stopped and "already finished" in detail:
            # the run ended as the signal came (Flower: "[code: 18] Run is already finished.")
            return _Outcome(0, run_id=run_id, signal=received[0], finished=True, detail=detail)
        if not stopped:
            update_out_dir_claim(run, continues=True)
        return _Outcome(128 + received[0], run_id=run_id, signal=received[0], stopped=stopped,
                        detail=detail)  # fmt: skip
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupted(run: Any, outcome: _Outcome, home: Path) -> int:
    """Tell what became of a run whose `federate run` was interrupted."""
    from inference.federated.deploy import CONNECTION, flower_bin

    assert outcome.signal is not None
    name = signal.Signals(outcome.signal).name
    env = f"FLWR_HOME={shlex.quote(str(home))} "
    if outcome.run_id is None:
        flwr = flower_bin("flwr")
        text = (
            f"interrupted ({name}) while the run was being submitted: the SuperLink may have "
            f"started it; list the runs with `{env}{shlex.join([flwr, 'list', CONNECTION])}` "
            f"and stop it with `{env}{shlex.join([flwr, 'stop', 'RUN_ID', CONNECTION])}`"
        )
    elif outcome.stopped:
        text = f"interrupted ({name}): run {outcome.run_id} stopped at the SuperLink"
        text += _resume_hint(run) or "; it had completed no round (no checkpoint)"
    else:
        stop = shlex.join([flower_bin("flwr"), "stop", outcome.run_id, CONNECTION])
        text = (
            f"interrupted ({name}), but stopping run {outcome.run_id} failed "
            f"({outcome.detail or 'no reason given'}): the run goes on at the SuperLink and "
            f"writes its model to {run.out}; stop it with: {env}{stop}"
        )
    sys.stderr.write(f"glioforecast federate run: {text}\n")
    return outcome.rc


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
    from inference.data import read_cohort
    from inference.federated.app import check_out_dir, claim_out_dir, release_out_dir

    try:
        run = _run_config(args)
        run = dataclasses.replace(run, simulation_data=str(Path(args.data).resolve()))
        present = sorted({p.site for p in read_cohort(args.data, survival_classes=None)})
        sites = run.site_list or tuple(present)
        _check_simulated_sites(run, sites, present, args.data)
        check_out_dir(run)
        # as `federate run`: a second run with this --out is refused until this one ends
        claim_out_dir(run, "simulate")
    except GlioforecastError as exc:
        return _fail("simulate", exc)
    try:
        return _simulate(args, run, sites)
    finally:
        release_out_dir(run)


def _simulate(args: argparse.Namespace, run: Any, sites: tuple[str, ...]) -> int:
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
    p.add_argument(
        "--site", default=None,
        help="the site's name, stored with its node at the SuperLink and in --flwr-home's "
        f"{SITES_FILE} (default: the key's file name without .pub)",
    )  # fmt: skip
    p.add_argument("--insecure", action="store_true")
    p.add_argument(
        "--flwr-home", default=None,
        help="folder to keep the connection settings in (FLWR_HOME of `flwr supernode list`, "
        "`flwr supernode unregister`) with the sites' node IDs; default: a temporary one",
    )  # fmt: skip
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

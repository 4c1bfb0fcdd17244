"""The ``glioforecast`` command."""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dicom_node import __version__, demo, outbox_cli
from dicom_node.argtypes import port_number, row_count, row_id
from dicom_node.errors import ConfigError, GlioforecastError, StorageError
from dicom_node.ports import host_port
from dicom_node.settings import ENV_CONFIG, Settings, load_settings, warnings_of

if TYPE_CHECKING:
    from dicom_node.audit import StudyRecord

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2

log = logging.getLogger(__name__)


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config)
    data_dir = getattr(args, "data_dir", None)
    if data_dir is not None:
        settings = dataclasses.replace(
            settings, storage=dataclasses.replace(settings.storage, data_dir=data_dir)
        )
    port = getattr(args, "port", None)
    if port is not None:
        settings = dataclasses.replace(settings, node=dataclasses.replace(settings.node, port=port))
    return settings


def _when(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


# ---------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from dicom_node.service import serve

    return serve(_settings(args), lambda: _settings(args))


def _unloadable(settings: Settings) -> list[str]:
    """What ``serve`` would refuse that the settings' own checks cannot see: TLS files that do
    not load (not PEM, a key that does not match its certificate), a data folder that is a
    file. Each loaded as the node loads it."""
    from dicom_node.audit import _client_context
    from dicom_node.scu import Destination
    from dicom_node.service import _server_context

    problems = []
    loaders: list[tuple[str, Any]] = [("", lambda: _server_context(settings.node.tls))]
    loaders += [("", lambda d=d: Destination.from_settings(d)) for d in settings.destinations]
    if settings.audit.enabled and settings.audit.host and settings.audit.transport == "tls":
        loaders.append(("audit: ", lambda: _client_context(settings.audit)))
    for prefix, load in loaders:
        try:
            load()
        except GlioforecastError as exc:
            problems.append(f"{prefix}{exc}")
    data_dir = settings.storage.data_dir
    blocking = next((p for p in (data_dir, *data_dir.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        problems.append(
            f"storage.data_dir: expected a folder, found {data_dir}"
            + (" is a file" if blocking == data_dir else f" under the file {blocking}")
        )
    return problems


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = load_settings(args.file or args.config)  # neither: $GLIOFORECAST_CONFIG, default
    problems = _unloadable(settings)
    if problems:
        raise ConfigError(settings.source, problems)
    if settings.model.directory is not None:  # loaded as a job would load it
        from dicom_node.worker import unusable_model

        problem = unusable_model(settings)
        if problem:
            raise ConfigError(settings.source, [f"model: {problem}"])
    print(f"{settings.source}: valid")
    if settings.source not in (None, "") and _sets_nothing(Path(str(settings.source))):
        print("  (the file sets nothing: every value is the embedded default's)")
    bound = sum(bool(c.certificate_names) for c in settings.node.allowed_callers)
    print(
        f"  node {settings.node.ae_title} on "
        f"{host_port(settings.node.bind_address, settings.node.port)}, "
        f"{len(settings.node.allowed_callers)} allowed caller rule(s)"
        + (f" ({bound} bound to client certificates)" if bound else "")
        + f", TLS {'on' if settings.node.tls.enabled else 'off'}"
    )
    data_dir = settings.storage.data_dir
    relative = "" if data_dir.is_absolute() else f" (from where it runs: here {data_dir.resolve()})"
    print(f"  data in {data_dir}{relative}, quiet period {settings.assembly.quiet_period_s} s")
    committing = [d.name for d in settings.destinations if d.storage_commitment]
    tls = [d.name for d in settings.destinations if d.tls.enabled]
    notices = [d.name for d in settings.destinations if d.failure_notice]
    rejecting = [d.name for d in settings.destinations if d.reject_replaced]
    web = [d.name for d in settings.destinations if d.dicomweb.url]
    print(
        f"  {len(settings.destinations)} destination(s)"
        + (f", storage commitment with {', '.join(committing)}" if committing else "")
        + (f", TLS to {', '.join(tls)}" if tls else "")
        + (f", failure notices to {', '.join(notices)}" if notices else "")
        + (f", rejection notes for replaced results to {', '.join(rejecting)}" if rejecting else "")
        + (f", DICOMweb (STOW-RS) to {', '.join(web)}" if web else "")
    )
    source = settings.retrieve.source
    how = (
        "QIDO-RS, WADO-RS"
        if source in web
        else f"C-FIND, C-MOVE to {settings.node.ae_title}"
        if settings.retrieve.method == "move"
        else "C-FIND, C-GET"
    )
    print(
        f"  missing RT objects asked of {source} ({how})"
        if source
        else "  missing RT objects asked of no PACS (retrieve.source empty)"
    )
    stow = settings.stow
    scheme = "https" if settings.node.tls.enabled else "http"
    print(
        f"  STOW-RS on {scheme}://{host_port(stow.bind_address, stow.port)}{stow.path}/studies for "
        f"{', '.join(c.name for c in stow.clients)}"
        if stow.enabled
        else "  STOW-RS receiver off"
    )
    audit = settings.audit
    where = [f"{host_port(audit.host, audit.port)} ({audit.transport})"] if audit.host else []
    where += [str(audit.file)] if audit.file is not None else []
    print(f"  audit trail {'to ' + ' and '.join(where) if audit.enabled else 'off'}")
    if settings.model.directory is not None:
        print(f"  model {settings.model.directory}: loads (device {settings.model.device})")
    else:
        print('  model: none, the "no change" baseline')
    for warning in warnings_of(settings):
        print(f"  warning: {warning}")
    return EXIT_OK


def cmd_version(args: argparse.Namespace) -> int:
    print(f"glioforecast {__version__}")
    return EXIT_OK


def _peer_tls(args: argparse.Namespace) -> dict[str, Any]:
    """The TLS arguments of ``echo`` and ``send`` (none without ``--tls`` or a TLS file)."""
    import ssl

    from dicom_node.scu import client_ssl_context

    files = (args.ca_certificates, args.certificate, args.private_key)
    if not args.tls and not any(files):
        return {}
    if (args.certificate is None) != (args.private_key is None):
        raise GlioforecastError(
            "expected --certificate and --private-key together (the client certificate and its "
            f"key), found only {'--certificate' if args.certificate else '--private-key'}"
        )
    try:
        context = client_ssl_context(*files)
    except (ssl.SSLError, OSError) as exc:
        raise GlioforecastError(
            f"cannot load the TLS files (--ca-certificates {args.ca_certificates}, "
            f"--certificate {args.certificate}, --private-key {args.private_key}): {exc}; "
            "expected PEM files this user can read"
        ) from exc
    return {"tls": context, "server_name": args.server_name or ""}


def cmd_echo(args: argparse.Namespace) -> int:
    from dicom_node.sender import echo

    tls = _peer_tls(args)
    status = echo(args.host, args.port, args.called_ae, args.calling_ae, **tls)
    over = " over TLS" if tls else ""
    print(f"C-ECHO {args.called_ae}@{host_port(args.host, args.port)}{over}: status 0x{status:04X}")
    return EXIT_OK if status == 0 else EXIT_FAILED


def cmd_check_destinations(args: argparse.Namespace) -> int:
    from dicom_node import dicomweb
    from dicom_node.audit import check_repository
    from dicom_node.scu import Destination
    from dicom_node.sender import check_destination, result_classes

    settings = _settings(args)
    wanted = set(args.names or [])
    unknown = wanted - {d.name for d in settings.destinations}
    if unknown:
        names = ", ".join(d.name for d in settings.destinations) or "none"
        raise GlioforecastError(
            f"check-destinations: expected destination names of the configuration ({names}), "
            f"found {', '.join(sorted(unknown))}"
        )
    chosen = [d for d in settings.destinations if not wanted or d.name in wanted]
    audit = settings.audit.enabled and bool(settings.audit.host) and not wanted
    if not chosen and not audit:
        print("no destination configured: nothing to check")
        return EXIT_OK
    failed = 0
    for entry in chosen:
        destination = Destination.from_settings(entry)
        source = entry.name == settings.retrieve.source
        ok, found = (
            dicomweb.check(destination)
            if destination.url
            else check_destination(
                destination,
                settings.sending.calling_ae_title,
                retrieve=settings.retrieve.method if source else "",
                results=result_classes(entry.objects, entry.failure_notice),
            )
        )
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {destination}: {found}")
    if audit:  # where the audit trail goes is checked with them
        ok, found = check_repository(settings.audit)
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {found}")
    return EXIT_OK if not failed else EXIT_FAILED


def cmd_send(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dicom_node.sender import collect_files, nothing_sent, send_files

    files = collect_files(args.paths)
    with tqdm(total=len(files), unit="file", desc="C-STORE", disable=args.quiet) as bar:
        report = send_files(
            files, args.host, args.port, args.called_ae, args.calling_ae, progress=bar.update,
            **_peer_tls(args),
        )  # fmt: skip
    for path, why in report.skipped:
        print(f"skipped {path}: {why}", file=sys.stderr)
    for path, why in report.failed:
        print(f"failed {path}: {why}", file=sys.stderr)
    print(f"sent {report.sent}, failed {len(report.failed)}, skipped {len(report.skipped)}")
    if not report.sent and not report.failed:
        raise GlioforecastError(nothing_sent(args.paths, len(files)))
    return EXIT_OK if not report.failed else EXIT_FAILED


def cmd_stow(args: argparse.Namespace) -> int:
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError
    from tqdm import tqdm

    from dicom_node.dicomweb import CHUNK, stow_batch
    from dicom_node.scu import Destination
    from dicom_node.sender import collect_files, not_part10, nothing_sent
    from dicom_node.settings import Destination as DestinationSettings
    from dicom_node.settings import DestinationTLS, DicomWebSettings

    if bool(args.username) != (args.password_file is not None):
        raise GlioforecastError(
            "expected --username and --password-file together (HTTP Basic), found only "
            + ("--username" if args.username else "--password-file")
        )
    if (args.certificate is None) != (args.private_key is None):
        raise GlioforecastError(
            "expected --certificate and --private-key together (the client certificate and its "
            f"key), found only {'--certificate' if args.certificate else '--private-key'}"
        )
    web = DicomWebSettings(url=args.url, token_file=args.token_file, username=args.username or "",
                           password_file=args.password_file)  # fmt: skip
    files_given = (args.ca_certificates, args.certificate, args.private_key)
    tls = DestinationTLS(True, *files_given) if any(files_given) else DestinationTLS()
    dest = Destination.from_settings(DestinationSettings(name="stow", dicomweb=web, tls=tls))
    files = collect_files(args.paths)
    sent, failed, skipped = 0, 0, 0
    with tqdm(total=len(files), unit="file", desc="STOW-RS", disable=args.quiet) as bar:
        for start in range(0, len(files), CHUNK):
            group, datasets = [], []
            for path in files[start : start + CHUNK]:
                try:
                    datasets.append(dcmread(path))
                    group.append(path)
                except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
                    skipped += 1
                    print(f"skipped {path}: {not_part10(exc)}", file=sys.stderr)
            for path, result in zip(group, stow_batch(datasets, dest), strict=True):
                if result.delivered:
                    sent += 1
                else:
                    failed += 1
                    print(f"failed {path}: {result.error}", file=sys.stderr)
            bar.update(len(files[start : start + CHUNK]))
    print(f"sent {sent}, failed {failed}, skipped {skipped}")
    if not sent and not failed:
        raise GlioforecastError(nothing_sent(args.paths, len(files)))
    return EXIT_OK if not failed else EXIT_FAILED


def _open_store(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from dicom_node.jobs import JobStore

    settings = _settings(args)
    db = settings.storage.database
    if not db.exists():
        raise GlioforecastError(
            f"no job database at {db}: expected a node that has run there{_which(args)}"
        )
    return settings, JobStore(db)


def _sets_nothing(path: Path) -> bool:
    """Whether a configuration file holds nothing but comments (or an empty mapping)."""
    from dicom_node.yamlload import load_yaml

    try:
        return path.is_file() and not load_yaml(path.read_text(encoding="utf-8"))
    except Exception:  # it validated: a file that reads at all reads here
        return False


def _which(args: argparse.Namespace) -> str:
    """What a command that found no data should add: where its configuration came from, when
    it is the embedded default (the likeliest mistake: the service's --config forgotten)."""
    if getattr(args, "config", None) or os.environ.get(ENV_CONFIG):
        return ""
    return (
        f" (no --config and no ${ENV_CONFIG}: the embedded default's data folder; the service's "
        "is in its configuration, e.g. --config /etc/glioforecast/glioforecast.yaml)"
    )


def cmd_jobs_list(args: argparse.Namespace) -> int:
    _, store = _open_store(args)
    jobs = store.list_jobs(state=args.state, limit=args.limit)
    if args.json:
        print(json.dumps([dataclasses.asdict(j) for j in jobs], indent=2))
        return EXIT_OK
    print(f"{'job':>5}  {'state':<10} {'ver':>3} {'inst':>5}  {'created':<19}  study / reason")
    for j in jobs:
        print(
            f"{j.id:>5}  {j.state:<10} {j.version:>3} {j.instance_count:>5}  "
            f"{_when(j.created_at):<19}  {j.study_instance_uid}"
        )
        if j.reason:
            print(f"{'':>48}{j.reason[:200]}")
    return EXIT_OK


def cmd_jobs_show(args: argparse.Namespace) -> int:
    from pydicom.uid import UID

    settings, store = _open_store(args)
    job = store.get_job(args.job_id)
    if job is None:
        print(store.no_such_job(args.job_id), file=sys.stderr)
        return EXIT_FAILED
    series = store.job_series(job.id)
    events = store.events(job.id)
    deliveries = _deliveries(settings, str(job.id))
    if args.json:
        out = dataclasses.asdict(job)
        out["deliveries"] = deliveries
        out["series"] = [
            {**dataclasses.asdict(s.series), "role": s.role, "note": s.note} for s in series
        ]
        out["events"] = [dataclasses.asdict(e) for e in events]
        print(json.dumps(out, indent=2))
        return EXIT_OK
    print(f"job {job.id}: {job.state} (version {job.version}, {job.instance_count} instances)")
    print(f"  study        {job.study_instance_uid}")
    print(f"  patient key  {job.patient_key}")
    print(f"  created      {_when(job.created_at)}   updated {_when(job.updated_at)}")
    if job.reason:
        print(f"  reason       {job.reason}")
    print("  series:")
    print(f"    {'role':<9} {'no.':>4}  {'description':<34} {'class':<28} {'inst':>5}")
    for s in series:
        number = "" if s.series.series_number is None else str(s.series.series_number)
        cls = UID(s.series.sop_class_uid).name
        label = s.series.series_description or s.series.text
        print(
            f"    {s.role or '-':<9} {number:>4}  {label[:34]:<34} {cls[:28]:<28} "
            f"{s.series.instance_count:>5}" + (f"  ({s.note})" if s.note else "")
        )
    print("  events:")
    for e in events:
        print(f"    {_when(e.at)}  {e.kind:<10} {e.message}")
    if deliveries:
        print("  deliveries (glioforecast outbox list):")
        for destination, by_state in sorted(deliveries.items()):
            states = " ".join(f"{state}={n}" for state, n in sorted(by_state.items()))
            print(f"    {destination:<16} {states}")
    return EXIT_OK


def _deliveries(settings: Settings, job: str) -> dict[str, dict[str, int]]:
    """The job's results by destination and outbox state ({} before anything was queued)."""
    from dicom_node.outbox import Outbox
    from dicom_node.outbox_cli import outbox_path

    path = outbox_path(settings.storage.data_dir)
    if not path.is_file():
        return {}
    try:
        with Outbox(path) as outbox:
            return outbox.counts(job=job)
    except StorageError as exc:  # the job is still shown
        log.warning("deliveries not shown: %s", exc)
        return {}


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    from dicom_node.assembler import Assembler

    settings, store = _open_store(args)
    try:
        state = Assembler(store, settings).retry(args.job_id)
    except KeyError:
        print(store.no_such_job(args.job_id), file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    job = store.get_job(args.job_id)
    print(f"job {args.job_id}: {state}" + (f" ({job.reason})" if job and job.reason else ""))
    return EXIT_OK if state != "failed" else EXIT_FAILED


def cmd_jobs_retrieve(args: argparse.Namespace) -> int:
    """Ask ``retrieve.source`` again for the RT objects of a failed job's study (made in the
    planning system after the node first asked): the running node's retriever does it."""
    from dicom_node.retrieve import asking

    settings, store = _open_store(args)
    source = settings.retrieve.source
    if not source:
        raise GlioforecastError(
            "jobs retrieve: expected retrieve.source in the configuration (the PACS to ask), "
            "found none"
        )
    try:
        store.request_retrieval(args.job_id, lambda reason: asking(reason, source))
    except KeyError:
        print(store.no_such_job(args.job_id), file=sys.stderr)
        return EXIT_FAILED
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_FAILED
    finally:
        store.close()
    print(f"job {args.job_id}: retrieving (the running node asks {source} at its next pass)")
    return EXIT_OK


def cmd_jobs_take_back(args: argparse.Namespace) -> int:
    """Take a job's results back from the destinations (withdrawn where not yet sent, rejected
    by an IOCM rejection note where ``reject_replaced`` is on): the running node's next
    delivery pass does it. Audited: DICOM Instances Accessed, action D, with the reason."""
    import contextlib
    import sqlite3
    import urllib.parse

    from pydicom.dataset import Dataset

    from dicom_node.audit import StudyRecord, audit_trail
    from dicom_node.notices import TAKEN_BACK_EVENT
    from dicom_node.outbox import Outbox
    from dicom_node.outbox_cli import outbox_path

    settings, store = _open_store(args)
    found = store.get_job(args.job_id)
    if found is None:
        raise GlioforecastError(store.no_such_job(args.job_id))
    configured = [d.name for d in settings.destinations]
    names = args.destination or configured
    unknown = sorted(set(names) - set(configured))
    if unknown:
        raise GlioforecastError(
            f"expected destination names of the configuration ({', '.join(configured) or 'none'})"
            f", found {', '.join(unknown)}"
        )
    job = str(args.job_id)
    data_dir = settings.storage.data_dir
    # the message joins the queue file the running node delivers from (the file, at once)
    audit = audit_trail(settings.audit, settings.node.ae_title, data_dir, deliver=False)
    audit.start(activity=False)
    try:
        with Outbox(outbox_path(data_dir)) as outbox:
            outbox.take_back(names, job, [job], f"Taken back by the site: {args.reason}")
            results = [i for i in outbox.items() if i.job == job and i.destination in names]
        store.add_event(
            args.job_id, TAKEN_BACK_EVENT, f"taken back at {', '.join(names)}: {args.reason}"
        )
        # the patient, as the job recorded it when it queued its results (what a rejection
        # note copies): the job database knows patients by a keyed hash only
        uri = f"file:{urllib.parse.quote(str(outbox_path(data_dir).absolute()))}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
            row = db.execute("SELECT study FROM job_studies WHERE job = ?", (job,)).fetchone()
        patient = Dataset.from_json(row[0]) if row else Dataset()
        study = StudyRecord.from_dataset(patient)
        study.study_instance_uid = found.study_instance_uid
        for sop_class_uid in {i.sop_instance_uid: i.sop_class_uid for i in results}.values():
            study.add(sop_class_uid)  # each result once, whatever the destinations
        audit.administered(
            "take-back",
            f"job {job}'s results taken back at {', '.join(names)} by the site: {args.reason} "
            "(withdrawn where not yet sent; rejected by an IOCM rejection note where "
            "reject_replaced is on)",
            data_dir=data_dir,
            studies=[study],
        )
    finally:
        store.close()
        audit.close()
    print(
        f"job {job}: its results will be taken back at {', '.join(names)} by the node's next "
        "delivery pass (withdrawn where not yet sent; rejected by an IOCM rejection note where "
        "reject_replaced is on); `jobs show` lists what was done"
    )
    return EXIT_OK


def cmd_spool_prune(args: argparse.Namespace) -> int:
    from dicom_node.audit import audit_trail
    from dicom_node.outbox import Outbox
    from dicom_node.outbox_cli import outbox_path
    from dicom_node.retention import describe, forget, prune

    settings, store = _open_store(args)
    outbox = Outbox(outbox_path(settings.storage.data_dir))
    # the messages join the queue file the running node delivers from (the file, at once)
    audit = audit_trail(
        settings.audit, settings.node.ae_title, settings.storage.data_dir, deliver=False
    )
    audit.start(activity=False)
    try:
        removals = prune(
            store, settings.storage.spool_dir, outbox, settings.retention, dry_run=args.dry_run,
            audit=audit,
        )  # fmt: skip
        forgotten = forget(store, outbox, settings.retention, dry_run=args.dry_run)
    finally:
        outbox.close()
        store.close()
        audit.close()
    print(describe(removals, args.dry_run, forgotten))
    return EXIT_FAILED if any(r.failed for r in removals) else EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    """Copy the data folder; audited as an Export (to the backup folder) once it is done."""
    from dicom_node.backup import backup

    settings = _settings(args)
    data_dir = settings.storage.data_dir
    report = backup(data_dir, args.destination, spool=not args.without_spool)
    print(report.describe())
    spool = (
        f"{report.spool_files} spool instance(s) of {report.studies} study(ies)"
        if not args.without_spool
        else "without the spool (--without-spool)"
    )
    _audit_done(
        settings,
        "backup",
        f"backup of the data folder {data_dir} into {report.destination}: {spool}, the "
        f"databases {', '.join(report.databases)}, {report.files} file(s) in all besides them, "
        f"{report.bytes / 2**20:.1f} MiB"
        + (
            f"; {report.unreadable} instance(s) of it whose study and patient could not be read"
            if report.unreadable
            else ""
        ),
        data_dir.resolve(),
        report.destination,
        report.exported,
    )
    return EXIT_OK


def _audit_done(
    settings: Settings, kind: Literal["backup", "restore"], description: str, data_dir: Path,
    other: Path, studies: Sequence[StudyRecord] = (),
) -> None:  # fmt: skip
    """Audit a backup (an Export for each study of ``studies``) or a restore that is done
    (:meth:`AuditTrail.administered`); a message that cannot be recorded is said on stderr,
    and the command still succeeds (it is done)."""
    from dicom_node.audit import audit_trail

    try:
        # the message joins the queue file the running node delivers from (the file, at once)
        audit = audit_trail(
            settings.audit, settings.node.ae_title, settings.storage.data_dir, deliver=False
        )
        audit.start(activity=False)
        try:
            audit.administered(kind, description, data_dir=data_dir, other=other, studies=studies)
        finally:
            audit.close()
    except GlioforecastError as exc:
        event = "Export" if kind == "backup" else "Security Alert"
        print(
            f"glioforecast: {kind}: done, but its audit message ({event}) could not be "
            f"recorded: {exc}",
            file=sys.stderr,
        )


def cmd_restore(args: argparse.Namespace) -> int:
    """Put a backup in place of the data folder, keeping the folder's audit trail; audited as
    a Security Alert (Software Configuration) in the restored folder's trail."""
    from dicom_node.backup import restore

    settings = _settings(args)
    data_dir = settings.storage.data_dir
    audit_files = [settings.audit.file] if settings.audit.file is not None else []
    done = restore(args.backup, data_dir, audit_files=audit_files)
    print(done.describe())
    _audit_done(
        settings,
        "restore",
        f"restore of the backup {done.backup} (made {done.made} by glioforecast "
        f"{done.version or 'before 0.1.0'}) into the data folder {done.data_dir}"
        + (f"; the folder that was there is kept at {done.aside}" if done.aside else ""),
        done.data_dir,
        done.backup,
    )
    return EXIT_OK


# ---------------------------------------------------------------------------- parser


def _add_peer(p: argparse.ArgumentParser) -> None:
    p.add_argument("host", help="peer host name or address")
    p.add_argument("port", type=port_number, help="peer port")
    p.add_argument("--called-ae", "-aec", default="ANY-SCP", help="peer AE title")
    p.add_argument("--calling-ae", "-aet", default="GLIOFORECAST", help="our AE title")
    tls = p.add_argument_group("DICOM over TLS (as a destination's tls settings)")
    tls.add_argument("--tls", action="store_true", help="associate over TLS 1.2 or later")
    tls.add_argument(
        "--ca-certificates", type=Path, metavar="PEM",
        help="CAs the peer's certificate must chain to (default: the system's; implies --tls)",
    )  # fmt: skip
    tls.add_argument(
        "--certificate", type=Path, metavar="PEM",
        help="our client certificate, for a peer that asks for one (with --private-key)",
    )  # fmt: skip
    tls.add_argument("--private-key", type=Path, metavar="PEM", help="its private key")
    tls.add_argument(
        "--server-name", metavar="NAME",
        help="the name the peer's certificate must carry (default: the host)",
    )  # fmt: skip


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", type=Path, help="override storage.data_dir of the config")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glioforecast",
        description="DICOM node predicting the post-treatment MRI of a glioblastoma "
        "(synthetic prediction, research use only).",
    )
    parser.add_argument(
        "--config",
        type=Path,
        help=f"YAML configuration (default: ${ENV_CONFIG}, else the embedded default)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the node (SCP, assembly, jobs)")
    _add_data_dir(p)
    p.add_argument("--port", type=port_number, help="override node.port of the config")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("echo", help="C-ECHO a DICOM peer")
    _add_peer(p)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser(
        "check-destinations",
        help="check that the configured destinations take results (C-ECHO with their TLS "
        "settings; the storage commitment context where configured)",
    )
    p.add_argument("names", nargs="*", help="only these destinations (default: all)")
    p.set_defaults(func=cmd_check_destinations)

    p = sub.add_parser("send", help="C-STORE files or folders to a DICOM peer")
    _add_peer(p)
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (recursive)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser(
        "stow", help="store files or folders in a DICOMweb service by STOW-RS (such as the "
        "node's own STOW-RS receiver)",
    )  # fmt: skip
    p.add_argument("url", help="the service's base URL, under which /studies is "
                   "(the node's: http(s)://HOST:11114/dicom-web)")  # fmt: skip
    p.add_argument("paths", nargs="+", type=Path, help="DICOM files or folders (recursive)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--token-file", type=Path, help="a file holding a bearer token")
    auth.add_argument("--username", help="HTTP Basic user (with --password-file)")
    p.add_argument("--password-file", type=Path, help="a file holding the HTTP Basic password")
    p.add_argument("--ca-certificates", type=Path, metavar="PEM",
                   help="https: CAs the service's certificate must chain to")  # fmt: skip
    p.add_argument("--certificate", type=Path, metavar="PEM",
                   help="https: our client certificate (with --private-key)")  # fmt: skip
    p.add_argument("--private-key", type=Path, metavar="PEM", help="its private key")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_stow)

    jobs = sub.add_parser("jobs", help="list, show or retry jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    p = jsub.add_parser("list", help="list recent jobs")
    _add_data_dir(p)
    p.add_argument(
        "--state", choices=("queued", "running", "done", "failed", "superseded", "retrieving")
    )
    p.add_argument("--limit", type=row_count, default=50)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs_list)
    p = jsub.add_parser("show", help="show a job: series, roles, events")
    _add_data_dir(p)
    p.add_argument("job_id", type=row_id)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_jobs_show)
    p = jsub.add_parser("retry", help="re-evaluate and re-queue a failed job")
    _add_data_dir(p)
    p.add_argument("job_id", type=row_id)
    p.set_defaults(func=cmd_jobs_retry)

    p = jsub.add_parser(
        "retrieve",
        help="ask retrieve.source again for the RT objects of a failed job's study (the "
        "running node asks, then assembles the study again with what came)",
    )
    _add_data_dir(p)
    p.add_argument("job_id", type=row_id)
    p.set_defaults(func=cmd_jobs_retrieve)

    p = jsub.add_parser(
        "take-back",
        help="take a job's results back from the destinations (a prediction that must not "
        "stand: consent withdrawn, a faulty model version...)",
    )
    _add_data_dir(p)
    p.add_argument("job_id", type=row_id)
    p.add_argument(
        "--reason", required=True,
        help="why, in words: it goes into the rejection note and the job's events",
    )  # fmt: skip
    p.add_argument(
        "--destination", action="append", metavar="NAME",
        help="only this destination (repeatable; default: all)",
    )  # fmt: skip
    p.set_defaults(func=cmd_jobs_take_back)

    spool = sub.add_parser("spool", help="spool retention")
    ssub = spool.add_subparsers(dest="spool_command", required=True, metavar="ACTION")
    p = ssub.add_parser(
        "prune",
        help="remove the files of studies the retention settings allow, then forget the "
        "records of studies whose files went retention.forget_days ago (the node does both "
        "every retention.check_interval_s)",
    )
    _add_data_dir(p)
    p.add_argument("--dry-run", action="store_true", help="list what would be removed")
    p.set_defaults(func=cmd_spool_prune)

    p = sub.add_parser(
        "backup",
        help="copy the data folder consistently, the node running or not (databases by "
        "SQLite's online backup, then the spool and the results waiting; glioforecast restore "
        "puts it back)",
    )
    _add_data_dir(p)
    p.add_argument("destination", type=Path, help="a new or empty folder (outside the data one)")
    p.add_argument(
        "--without-spool", action="store_true",
        help="leave the received instances out (the PACS keeps them too)",
    )  # fmt: skip
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser(
        "restore",
        help="put a backup in place of the data folder, the node stopped (the folder there is "
        "moved aside, not removed)",
    )
    _add_data_dir(p)
    p.add_argument("backup", type=Path, help="a folder made by glioforecast backup")
    p.set_defaults(func=cmd_restore)

    outbox_cli.register(sub)
    outbox_actions: Any = sub.choices["outbox"]._subparsers._group_actions  # type: ignore[union-attr]
    for action in outbox_actions:
        for outbox_parser in action.choices.values():
            _add_data_dir(outbox_parser)

    demo.register(sub)
    # the synthetic cohort and the model commands live in inference/; their modules import
    # torch and MONAI only when a command runs
    from inference import cli as model_cli
    from inference.synthetic import cli as synth_cli

    synth_cli.register(sub)
    model_cli.register(sub)

    p = sub.add_parser("check-config", help="validate a configuration file")
    p.add_argument(
        "file", type=Path, nargs="?",
        help=f"the file (default: --config, else ${ENV_CONFIG}, else the embedded default)",
    )  # fmt: skip
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("version", help="print the version")
    p.set_defaults(func=cmd_version)
    return parser


def _command_parser(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> argparse.ArgumentParser:
    """The parser of the (sub)command ``argv`` names: where its usage errors belong."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for n, token in enumerate(argv):
                if token in action.choices:
                    return _command_parser(action.choices[token], argv[n + 1 :])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    given = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(given)
    if extra:  # argparse would show the top level's usage for a subcommand's stray argument
        _command_parser(parser, given).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "outbox" and args.data_dir is None:
            args.data_dir = _settings(args).storage.data_dir
        return int(args.func(args))
    except ConfigError as exc:
        print(f"glioforecast: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except GlioforecastError as exc:
        print(f"glioforecast: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `glioforecast jobs list | head`: the reader went away
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())

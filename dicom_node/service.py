"""The node as a service: start-up reconciliation, the SCP, the assembly loop, clean shutdown."""

from __future__ import annotations

import contextlib
import faulthandler
import fcntl
import json
import logging
import os
import re
import signal
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from pydicom import dcmread

from dicom_node.assembler import Assembler
from dicom_node.audit import audit_trail
from dicom_node.commitment import CommitmentReport
from dicom_node.errors import ConfigError, GlioforecastError
from dicom_node.health import HealthServer, prometheus
from dicom_node.instance import InstanceInfo, installation_secret
from dicom_node.jobs import JOB_STATES, QUEUED, JobStore
from dicom_node.listener import ConnectionLimit, cannot_listen
from dicom_node.notices import FailureNotices
from dicom_node.outbox import Outbox, OutboxSender, Replaced, RetryPolicy
from dicom_node.outbox_cli import outbox_path
from dicom_node.ports import host_port
from dicom_node.rejections import apply_rejection
from dicom_node.reload import files_key, plan_reload, secret_files
from dicom_node.retention import forget, prune
from dicom_node.retrieve import Retriever, not_asked
from dicom_node.roles import sop_class_uid
from dicom_node.scp import ANNOTATION_CLASSES, StorageSCP, server_ssl_context
from dicom_node.scu import Destination
from dicom_node.sdnotify import notify, watchdog_interval_s
from dicom_node.settings import LoggingSettings, Settings, TLSSettings, warnings_of
from dicom_node.spool import Spool
from dicom_node.stow import StowReceiver, load_clients
from dicom_node.worker import Worker, unusable_model

log = logging.getLogger(__name__)


class _JobField(logging.Filter):
    """Give every record a ``job`` attribute so formats can show it: ``job`` (the job a job
    process runs) or "-" when the record names none."""

    def __init__(self, job: int | str = "-") -> None:
        super().__init__()
        self.job = job

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "job"):
            record.job = self.job
        return True


#: loggers of the libraries that read and write data sets: their messages quote the values
#: (pydicom's "Invalid value for VR DA: '1941-01-01'" is a birth date), which the node's logs
#: must not carry (DESIGN: no patient name, ID or birth date in the logs)
_QUOTING_LOGGERS = ("pydicom", "highdicom")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
#: control characters, which a data set's text (a series description) can bring into a message
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")


class _NoValues(logging.Filter):
    """Leave out what the DICOM libraries quote of a data set: the values, not the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in _QUOTING_LOGGERS or record.name == "py.warnings":
            record.msg, record.args = _QUOTED.sub("'...'", record.getMessage()), ()
        return True


def _one_line(text: str) -> str:
    """``text`` with its control characters escaped: a line break in a series description
    cannot start a forged log line."""
    return _CONTROL.sub(lambda m: repr(m.group())[1:-1], text)


class _TextFormatter(logging.Formatter):
    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = _one_line(record.message)
        return super().formatMessage(record)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname,
            "logger": record.name,
            "job": getattr(record, "job", "-"),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: LoggingSettings, job: int | None = None) -> None:
    """The node's log: its format, its filters; ``job``: the job this process runs (a job
    process), named on each of its lines."""
    handler = logging.StreamHandler()
    handler.addFilter(_JobField("-" if job is None else job))
    handler.addFilter(_NoValues())
    if settings.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            _TextFormatter("%(asctime)s %(levelname)-7s %(name)s [job %(job)s] %(message)s")
        )
    # Python warnings go through the log (its format, its filters), not raw to stderr; pydicom
    # logs each of its warnings as well, so those are not taken twice
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", category=UserWarning, module="pydicom")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.level)
    # pynetdicom is chatty at INFO (one line per PDU), highdicom too (a line per module copied
    # into each result object, its values masked by _NoValues): warnings only unless debugging
    for chatty in ("pynetdicom", "highdicom"):
        logging.getLogger(chatty).setLevel(
            logging.DEBUG if settings.level == "DEBUG" else logging.WARNING
        )


def reconcile(spool: Spool, store: JobStore, secret: bytes) -> dict[str, int]:
    """Bring the database in line with the spool after a crash or restart.

    - partial temp files were never acknowledged: removed;
    - files on disk but not in the database (killed between rename and insert): recorded;
    - files whose instance retention marked removed (killed between its database commit and
      its deletions): deleted, as retention meant (recorded, they brought the study back and
      ran it again);
    - rows whose file is gone: removed, with an event.
    Jobs need no repair: each is created in one transaction, and instances not yet in a job
    keep their study pending, so the assembler picks them up.
    """
    removed_tmp = spool.clean_tmp()
    known = store.known_paths()
    on_disk = set(spool.iter_files())
    retained = on_disk & store.removed_paths() - known
    for rel in sorted(retained):
        with contextlib.suppress(FileNotFoundError):
            (spool.root / rel).unlink()
    added = duplicates = 0
    # in order of arrival, so that of two unrecorded copies of one instance the first received
    # is kept, as the receiver would have kept it (the path only breaks ties)
    for rel in sorted(on_disk - known - retained, key=lambda r: (_arrival(spool.root / r), r)):
        path = spool.root / rel
        try:
            ds = dcmread(path, stop_before_pixels=True)
            tsyntax = str(ds.file_meta.TransferSyntaxUID)
            info = InstanceInfo.from_dataset(ds, tsyntax, secret)
        except Exception as exc:  # pydicom raises many types on damaged files
            log.error("spool file %s cannot be read back (%s); left in place", rel, exc)
            continue
        if store.record_instance(info, rel, "(recovered)", path.stat().st_mtime):
            # a rejection note whose recording a crash cut short is applied now
            apply_rejection(store, ds, info.series_description, "(recovered)")
            added += 1
        elif (held := store.stored_instance(info.sop_instance_uid)) and held[1] != rel:
            # a second copy of an instance held under another study or series: the held one
            # is kept, as the receiver does
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            duplicates += 1
    missing = sorted(known - on_disk)
    if missing:
        store.forget_instances(missing)
    summary = {
        "removed_partial": removed_tmp,
        "recovered": added,
        "missing": len(missing),
        "removed_by_retention": len(retained),
        "duplicates_removed": duplicates,
    }
    if any(summary.values()):
        log.warning("reconciled spool and database: %s", summary)
    return summary


def _arrival(path: Path) -> int:
    """When a spool file was written (ns; a file gone since it was listed sorts first)."""
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


#: studies whose files one retention pass of the running node removes at most
RETENTION_BATCH = 50
#: how long a stop waits for each destination's loop to end its C-STORE under way (60 s: the
#: C-STORE response timeout)
SENDER_STOP_S = 70


def _inert_classes(settings: Settings) -> frozenset[str]:
    """The annotation classes that do not reopen a study: those no role rule uses."""
    used = {sop_class_uid(c) for rule in settings.roles.rules for c in rule.sop_classes}
    return ANNOTATION_CLASSES - used


def _server_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The receiver's TLS context (None without TLS), its files read now."""
    if not tls.enabled:
        return None
    assert tls.certificate is not None and tls.private_key is not None
    try:
        return server_ssl_context(
            str(tls.certificate),
            str(tls.private_key),
            str(tls.ca_certificates) if tls.ca_certificates else None,
            tls.require_client_certificate,
        )
    except (ssl.SSLError, OSError) as exc:
        raise GlioforecastError(
            f"node.tls: cannot load its files (certificate {tls.certificate}, private_key "
            f"{tls.private_key}, ca_certificates {tls.ca_certificates}): {exc}; expected PEM "
            "files, the key matching the certificate"
        ) from exc


def _uri(source: str) -> str:
    """The configuration's source as the audit trail names it: a file URI, else as it is."""
    path = Path(source)
    return path.resolve().as_uri() if path.is_file() else source


#: the file whose lock says that a node runs on the data folder (it holds that node's pid)
LOCK_FILE = "serve.lock"


def lock_data_dir(data_dir: Path) -> int:
    """Take the data folder for this process (one node per folder: two would run each other's
    jobs, and one's start-up would remove the files the other is writing); the lock goes with
    the returned descriptor, or with the process, however it ends."""
    path = data_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise GlioforecastError(
            f"the data folder {data_dir} is in use by another glioforecast serve (pid {holder}); "
            "expected one node per data folder: stop that one, or give this one another "
            "storage.data_dir (or --data-dir)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _unwritable(data_dir: Path, exc: OSError) -> str:
    """Why the node cannot use its data folder, and what to change."""
    import pwd

    user = pwd.getpwuid(os.geteuid()).pw_name
    blocking = next((p for p in (data_dir, *data_dir.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        return (
            f"the data folder {data_dir} cannot be used: expected a folder, found "
            f"{'a file' if blocking == data_dir else f'the file {blocking} in its path'}; set "
            "storage.data_dir (--data-dir) to a folder, or move the file away"
        )
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(data_dir) else ""
    return (
        f"the data folder {data_dir} cannot be used: {exc.strerror or exc}{where}; expected a "
        f"folder that the user {user} can create and write: fix its owner and mode (install -d "
        "-o glioforecast -g glioforecast -m 0750 ...), or set storage.data_dir (--data-dir)"
    )


#: who may call the node and how it is authenticated: a reload that changes these is a
#: security configuration change
SECURITY_KEYS = (
    "node.allowed_callers", "node.refuse_unknown_callers", "node.tls", "stow.clients",
)  # fmt: skip


class Node:
    """Everything ``glioforecast serve`` runs, startable and stoppable from tests.

    ``load`` reads the configuration again for :meth:`reload` (SIGHUP); without it a reload
    is refused.
    """

    def __init__(self, settings: Settings, load: Callable[[], Settings] | None = None) -> None:
        self.settings = settings
        self._load = load
        self._reload_requested = False  # set by SIGHUP (see request_reload)
        self.reloads = {"applied": 0, "unchanged": 0, "refused": 0}
        self.last_reload: tuple[bool, float] = (True, time.time())  # (successful, when)
        self._files = secret_files(settings)  # what the TLS and secret files held
        data_dir = settings.storage.data_dir
        try:
            existed = data_dir.is_dir()
            data_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
            if not existed:
                log.info("data folder %s created (a new node: nothing received yet)", data_dir)
            self._lock = lock_data_dir(data_dir)
        except OSError as exc:
            raise GlioforecastError(_unwritable(data_dir, exc)) from exc
        try:
            self._open(settings)
        except OSError as exc:
            os.close(self._lock)
            raise GlioforecastError(_unwritable(data_dir, exc)) from exc
        except BaseException:
            os.close(self._lock)
            raise

    def _open(self, settings: Settings) -> None:
        data_dir = settings.storage.data_dir
        self.secret = installation_secret(data_dir)
        self.spool = Spool(settings.storage.spool_dir, settings.storage.min_free_mb * 2**20)
        self.store = JobStore(settings.storage.database)
        self.assembler = Assembler(self.store, settings)
        ctx = _server_context(settings.node.tls)
        self.audit = audit_trail(settings.audit, settings.node.ae_title, data_dir)
        self.outbox = Outbox(
            outbox_path(data_dir), policy=RetryPolicy.from_settings(settings.sending)
        )
        self.sender = OutboxSender(
            self.outbox,
            [Destination.from_settings(d) for d in settings.destinations],
            calling_ae=settings.sending.calling_ae_title,
            audit=self.audit,
            on_replaced=self._replaced,
            timeout_s=settings.sending.response_timeout_s,
        )
        self.scp = StorageSCP(
            settings.node,
            self.spool,
            self.store,
            self.secret,
            ctx,
            max_queued_jobs=settings.worker.max_queued_jobs,
            commitment_reports=(
                self._commitment_report
                if any(d.storage_commitment for d in settings.destinations)
                else None
            ),
            audit=self.audit,
            inert_sop_classes=_inert_classes(settings),
            sending_ae_title=settings.sending.calling_ae_title,
        )
        self.assembler.arriving = self.scp.studies_arriving
        self.stow = (
            StowReceiver(settings.stow, self.scp, data_dir) if settings.stow.enabled else None
        )
        self.worker = Worker(settings, self.store, self.sender.wake)
        self.notices = FailureNotices(settings, self.store, self.outbox, self.sender.wake)
        self.retriever = (
            Retriever(settings, self.store, self.audit, self.scp)
            if settings.retrieve.source
            else None
        )
        self.health: HealthServer | None = None
        if settings.health.enabled:
            h = settings.health
            try:
                self.health = HealthServer(
                    h.bind_address, h.port, self.summary, self.metrics,
                    limits=self.scp.connection_limits, refusals=self.scp.refusals,
                )  # fmt: skip
            except OSError as exc:
                raise GlioforecastError(
                    cannot_listen("health endpoint", h.bind_address, h.port, exc, "health", True)
                ) from exc
        self._stop = threading.Event()
        self._failures: dict[str, tuple[str, float]] = {}  # main loop step -> (error, when logged)
        self._signalled = False  # set by SIGTERM / SIGINT (see request_stop)

    def start(self) -> None:
        self.audit.start()
        reconcile(self.spool, self.store, self.secret)
        if self.retriever is None:
            ended = self.store.end_retrievals(not_asked)
            if ended:
                log.warning("%d job(s) waiting for a PACS failed: retrieve.source is empty", ended)
        self.sender.start()
        self.worker.start()
        # studies a stop cut off wait one quiet period more: their senders, aborted by the
        # stop, send them again, and a half study does not become a job that fails on a gap
        self.assembler.not_before = time.time() + self.settings.assembly.quiet_period_s
        self.scp.start()
        if self.stow is not None:
            self.stow.start()
            log.info(
                "STOW-RS on %s://%s%s/studies", "https" if self.scp.ssl_context else "http",
                host_port(self.settings.stow.bind_address, self.stow.port),
                self.settings.stow.path,
            )  # fmt: skip
        if self.retriever is not None:  # the PACS's C-MOVE sends to the receiver
            self.retriever.start()
        if self.health is not None:
            self.health.start()
            log.info(
                "health and metrics on http://%s/health",
                host_port(self.settings.health.bind_address, self.health.port),
            )
        log.info(
            "listening as %s on %s%s; data in %s",
            self.settings.node.ae_title,
            host_port(self.settings.node.bind_address, self.scp.port),
            " (TLS)" if self.settings.node.tls.enabled else "",
            self.settings.storage.data_dir,
        )

    def run_forever(self) -> None:
        """Assemble jobs until :meth:`request_stop` (or SIGTERM / SIGINT).

        Under systemd (``Type=notify``) it says READY once listening and, when a watchdog is
        set, pets it from this loop, so a hung loop gets the service restarted.
        """
        watchdog = watchdog_interval_s()
        notify("READY=1\nSTATUS=accepting associations")
        next_retention = time.monotonic()
        retention = self.settings.retention
        while not (self._stop.is_set() or self._signalled):
            if watchdog is not None:
                notify("WATCHDOG=1")
            if self._reload_requested:
                self._reload_requested = False
                self.reload()
            if self.settings.retention != retention:  # a reload changed it: a pass now
                retention, next_retention = self.settings.retention, time.monotonic()
            # each part on its own: one that fails (and is tried again at the next pass) must
            # not keep the others from running
            if self._guarded("assembly pass", self.assembler.run_once):
                self.worker.wake()
            self._guarded("failure notices", self.notices.run_once)
            self._guarded("notices taken back", self.notices.take_back_once)
            self._guarded("refusals report", self.scp.refusals.flush)
            if time.monotonic() >= next_retention:
                next_retention = time.monotonic() + self._retention_pass()
            interval = self.settings.assembly.poll_interval_s  # (a reload may change it)
            self._stop.wait(interval if watchdog is None else min(interval, watchdog))

    def _guarded(self, what: str, step: Callable[[], object]) -> object:
        """``step()``, or None when it raised: logged with its traceback the first time, then
        once an hour while it fails the same way (the main loop tries it again each pass)."""
        try:
            result = step()
        except Exception as exc:
            said = f"{type(exc).__name__}: {exc}"
            now = time.monotonic()
            last = self._failures.get(what)
            if last is None or last[0] != said or now - last[1] >= 3600:
                log.exception("%s failed; tried again at each pass", what)
                self._failures[what] = (said, now)
            return None
        if self._failures.pop(what, None) is not None:
            log.info("%s works again", what)
        return result

    def request_reload(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        """SIGHUP: read the configuration again, from the main loop (within one poll interval;
        a signal handler must not do the work, see :meth:`request_stop`)."""
        self._reload_requested = True

    def reload(self) -> str:
        """Read the configuration file again and apply it to the running node: 'applied',
        'unchanged', or 'refused' (unreadable, invalid, or a key changed that takes a
        restart: then nothing is applied and the node goes on as it was). Logged, audited,
        counted in the metrics, and told to systemd."""
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        old = self.settings
        changed: tuple[str, ...] = ()
        try:
            if self._load is None:
                raise GlioforecastError("expected a configuration file to read again; this node "
                                        "was started without one")  # fmt: skip
            new = self._load()
            files = secret_files(new)
            plan = plan_reload(old, new, self._files, files)
            changed = plan.changed
            if plan.restart:
                raise GlioforecastError(
                    f"{', '.join(plan.restart)} changed, which a running node cannot take "
                    "(systemctl restart glioforecast applies the file)"
                )
            if any(key == "model" or key.startswith("model.") for key in changed):
                problem = unusable_model(new, waiting=lambda: notify("WATCHDOG=1"))
                if problem:
                    raise GlioforecastError(f"model: {problem}")
            if changed:
                self._apply(new, tls_files=files_key("node.tls") in changed)
                self._files = files
        except Exception as exc:  # whatever the file holds, the node goes on as it was
            if not isinstance(exc, GlioforecastError):
                log.exception("configuration reload failed")
            result, source = "refused", old.source
            detail = f"configuration not reloaded from {source}: {exc}; nothing was applied"
            log.error("%s; the node goes on with the configuration it had", detail)
            self.last_reload = (False, self.last_reload[1])
        else:
            result, source = ("applied" if changed else "unchanged"), new.source
            detail = f"configuration reloaded from {source}: " + (
                f"{', '.join(changed)} applied" if changed else "nothing changed"
            )
            log.info("%s", detail)
            for warning in warnings_of(new) if changed else ():
                log.warning("configuration: %s", warning)
            self.last_reload = (True, time.time())
        if result != "unchanged":
            security = any(k.startswith(SECURITY_KEYS) for k in changed)
            self.audit.configured(_uri(source), security=security, applied=result == "applied",
                                  description=detail)  # fmt: skip
        self.reloads[result] += 1
        notify(f"READY=1\nSTATUS=accepting associations; configuration reload {result}")
        return result

    def _apply(self, new: Settings, tls_files: bool = False) -> None:
        """Hand ``new`` to every part of the running node (``tls_files``: the receiver's TLS
        files changed); raises, changing nothing, when TLS files cannot be loaded."""
        ctx = self.scp.ssl_context
        if tls_files or new.node.tls != self.settings.node.tls:
            ctx = _server_context(new.node.tls)
        web_clients = load_clients(new.stow.clients) if self.stow is not None else ()
        destinations = [Destination.from_settings(d) for d in new.destinations]
        peer = next((d for d in destinations if d.name == new.retrieve.source), None)
        started = None  # a retriever the reload starts (retrieve.source set where it was not)
        if peer is not None and self.retriever is None:
            started = Retriever(new, self.store, self.audit, self.scp)
        # from here on nothing raises: each part reads its settings at its next use
        old, self.settings = self.settings, new
        if new.logging != old.logging:
            configure_logging(new.logging)
        self.scp.settings = new.node
        self.scp.ssl_context = ctx  # the next handshake
        if self.scp.server is not None:
            self.scp.server.ssl_context = ctx
        self.scp.max_queued_jobs = new.worker.max_queued_jobs
        if self.stow is not None:
            self.stow.configure(new.stow, web_clients)
            if self.stow.server is not None:
                self.stow.server.ssl_context = ctx
        self.scp.inert_sop_classes = _inert_classes(new)
        self.assembler.settings = new
        self.worker.settings = new
        self.notices.settings = new
        self.outbox.policy = RetryPolicy.from_settings(new.sending)
        self.sender.calling_ae = new.sending.calling_ae_title
        self.scp.sending_ae_title = new.sending.calling_ae_title
        self.sender.timeout_s = new.sending.response_timeout_s
        self.sender.destinations = destinations
        if peer is None:
            if self.retriever is not None:
                self.retriever.stop(timeout=0)  # a pass under way finishes by itself
                self.retriever = None
                ended = self.store.end_retrievals(not_asked)
                if ended:
                    log.warning("%d job(s) waiting for a PACS failed: retrieve.source is empty",
                                ended)  # fmt: skip
        elif started is not None:
            self.retriever = started
            started.start()
        elif self.retriever is not None:
            self.retriever.configure(new, peer)
        self.sender.wake()
        self.worker.wake()

    def _retention_pass(self) -> float:
        """Remove the spool files retention allows, then forget the records it allows, a
        bounded number of studies at a time so that the loop keeps assembling (and petting the
        watchdog); seconds to the next pass."""
        retention = self.settings.retention
        try:
            removed = prune(
                self.store, self.spool.root, self.outbox, retention, limit=RETENTION_BATCH,
                audit=self.audit,
            )  # fmt: skip
            forgotten = forget(self.store, self.outbox, retention, limit=RETENTION_BATCH)
        except Exception:
            log.exception("retention pass failed; will retry")
            return retention.check_interval_s
        more = len(removed) >= RETENTION_BATCH or len(forgotten) >= RETENTION_BATCH
        return 0.0 if more else retention.check_interval_s

    def _commitment_report(self, report: CommitmentReport) -> None:
        """A PACS reported on its storage commitment: record it, and send again at once what it
        did not keep."""
        counts = self.outbox.apply_report(report)
        if counts["failed"]:
            self.sender.wake()

    def _replaced(self, replaced: Replaced) -> None:
        """Newer results replaced earlier ones at a destination: the job's events say what was
        withdrawn or rejected (``jobs show N``)."""
        self.store.add_event(int(replaced.job), "replaced", str(replaced))

    def request_stop(self, signum: int | None = None, frame: FrameType | None = None) -> None:
        if signum is not None:
            # A signal handler runs on the main thread, possibly inside ``self._stop.wait()``
            # at the moment that thread holds the event's internal lock: setting the event here
            # would wait on that lock forever (seen once in CI: the node ignored SIGTERM). The
            # handler only raises a flag, which the loop reads within one poll interval.
            self._signalled = True
            log.info("signal %s received: stopping", signal.Signals(signum).name)
            return
        self._stop.set()

    def summary(self) -> dict[str, object]:
        """What /health answers: component states and job counts (no patient data)."""
        components = {
            "receiver": self.scp.server is not None,
            "worker": self.worker.alive,
            "sender": self.sender.alive,
            # false while jobs wait because one could not store its results (disk full...),
            # or while the spool refuses the instances received
            "storage": self.worker.storage_wait_s == 0 and not self.scp.spool_failure,
        }
        if self.stow is not None:
            components["stow"] = self.stow.alive
        if self.retriever is not None:
            components["retriever"] = self.retriever.alive
        if self.audit.enabled:  # a node that cannot audit what it receives is degraded
            components["audit"] = self.audit.reachable
        return {
            "status": "ok" if all(components.values()) else "degraded",
            "components": components,
            "jobs": self.store.counts(),
            "outbox": self.outbox.counts(),
        }

    def metrics(self) -> str:
        counts = self.store.counts()
        done_jobs, done_seconds = self.store.durations()
        samples: list[tuple[str, str, dict[str, str], float]] = [
            ("glioforecast_up", "1 while the node runs", {}, 1),
            (
                "glioforecast_config_last_reload_successful",
                "0 when the last configuration reload (SIGHUP) was refused, else 1",
                {},
                int(self.last_reload[0]),
            ),
            (
                "glioforecast_config_last_reload_success_timestamp_seconds",
                "when the configuration was last read with success (start or reload)",
                {},
                round(self.last_reload[1], 3),
            ),
        ]
        for result, n in self.reloads.items():
            samples.append(
                (
                    "glioforecast_config_reloads_total",
                    "configuration reloads (SIGHUP) by result",
                    {"result": result},
                    n,
                )
            )
        if self.stow is not None:
            samples.append(("glioforecast_stow_requests_in_progress",
                            "STOW-RS requests being read and stored", {},
                            self.stow.in_progress))  # fmt: skip
            for code, n in sorted(self.stow.answered().items()) or [(200, 0)]:
                samples.append(("glioforecast_stow_requests_total",
                                "STOW-RS requests answered, by HTTP status", {"code": str(code)},
                                n))  # fmt: skip
        listeners = [
            ("dicom", self.scp.server),
            ("stow", self.stow and self.stow.server),
            ("health", self.health and self.health.server),
        ]
        for name, server in listeners:
            if isinstance(server, ConnectionLimit):
                samples.append(("glioforecast_connections_open",
                                "connections a listener holds open (associations or not)",
                                {"listener": name}, server.open_connections))  # fmt: skip
        for name, server in listeners:
            if isinstance(server, ConnectionLimit):
                for limit in ("max_connections", "max_connections_per_host", "accept_failed"):
                    samples.append(("glioforecast_connections_refused_total",
                                    "connections closed at once, by the limit they were over "
                                    "(accept_failed: no file descriptor left)",
                                    {"listener": name, "reason": limit},
                                    server.refused[limit]))  # fmt: skip
        for reason in ("called_ae_title", "calling_ae_title", "max_associations"):
            samples.append(("glioforecast_associations_refused_total",
                            "A-ASSOCIATE-RQ answered A-ASSOCIATE-RJ, by why: an AE title the "
                            "node does not answer to or does not know, or node.max_associations",
                            {"reason": reason}, self.scp.associations_refused[reason]))  # fmt: skip
        for state in JOB_STATES:
            samples.append(("glioforecast_jobs", "jobs by state", {"state": state}, counts[state]))
        samples.append(("glioforecast_studies_not_assembled",
                        "studies that could not be made a job at the last pass, a fault of the "
                        "node's (its log says which and why); tried again at each pass",
                        {}, len(self.assembler.failing)))  # fmt: skip
        samples += [
            ("glioforecast_queue_depth", "jobs waiting for the worker", {}, counts[QUEUED]),
            (
                "glioforecast_worker_storage_wait_seconds",
                "seconds before jobs start again after one could not store its results (disk "
                "full, a folder refusing writes); 0 when none",
                {},
                round(self.worker.storage_wait_s, 1),
            ),
            (
                "glioforecast_instances_received_total",
                "instances stored in the spool since the database was made",
                {},
                counts["instances"] + counts["instances_removed"] + counts["instances_forgotten"],
            ),
            ("glioforecast_spool_instances", "instances in the spool", {}, counts["instances"]),
            (
                "glioforecast_rejected_instances",
                "instances IOCM rejection notes took out of use (received or still to come)",
                {},
                counts["instances_rejected"],
            ),
            (
                "glioforecast_retention_removed_instances",
                "instances whose files retention removed from the spool (their records not yet "
                "forgotten)",
                {},
                counts["instances_removed"],
            ),
            (
                "glioforecast_retention_forgotten_studies_total",
                "studies whose records retention forgot (retention.forget_days after their files)",
                {},
                counts["studies_forgotten"],
            ),
            (
                "glioforecast_job_duration_seconds_sum",
                "time from start to end of done jobs",
                {},
                done_seconds,
            ),
            ("glioforecast_job_duration_seconds_count", "", {}, done_jobs),
            (
                "glioforecast_spool_free_bytes",
                "free space on the spool's file system",
                {},
                self.spool.free_bytes(),
            ),
            (
                "glioforecast_spool_min_free_bytes",
                "storage.min_free_mb: below it the receiver answers 0xA700 (senders retry later)",
                {},
                self.settings.storage.min_free_mb * 2**20,
            ),
        ]
        for destination, by_state in sorted(self.outbox.counts().items()):
            for state, n in sorted(by_state.items()):
                samples.append(
                    (
                        "glioforecast_deliveries",
                        "result deliveries by destination and state",
                        {"destination": destination, "state": state},
                        n,
                    )
                )
        waiting = self.outbox.oldest_waiting()
        for destination in sorted({*waiting, *(d.name for d in self.settings.destinations)}):
            samples.append(
                (
                    "glioforecast_delivery_oldest_waiting_seconds",
                    "age of the oldest result not yet delivered (or committed) to a destination, "
                    "0 when none waits",
                    {"destination": destination},
                    round(waiting.get(destination, 0.0), 3),
                )
            )
        if self.audit.enabled:
            samples += [
                (
                    "glioforecast_audit_messages_sent_total",
                    "audit messages delivered to the audit record repository",
                    {},
                    self.audit.sent,
                ),
                (
                    "glioforecast_audit_messages_dropped_total",
                    "audit messages dropped: the repository stayed unreachable",
                    {},
                    self.audit.dropped,
                ),
                (
                    "glioforecast_audit_messages_queued",
                    "audit messages waiting for the repository",
                    {},
                    self.audit.queued,
                ),
            ]
        components: dict[str, bool] = self.summary()["components"]  # type: ignore[assignment]
        for name, up in components.items():
            samples.append(
                (
                    "glioforecast_component_up",
                    "1 while a part of the node runs",
                    {"component": name},
                    int(up),
                )
            )
        return prometheus(samples, summaries=frozenset({"glioforecast_job_duration_seconds"}))

    def stop(self) -> None:
        """Stop receiving, let the current job finish, stop sending, close the databases."""
        notify("STOPPING=1")
        self._stop.set()
        self.worker.request_stop()  # no job starts once the stop has begun
        if self.health is not None:
            self.health.stop()
        if self.retriever is not None:  # before the receiver its C-MOVEs send to
            self.retriever.stop()
        if self.stow is not None:
            self.stow.stop()
        self.scp.stop()
        self.worker.stop(timeout=120)  # lets the current job finish
        # each destination's loop ends after the object it is sending (up to a C-STORE's
        # timeout); what it has not sent is pending again, sent at the next start
        busy = self.sender.stop(timeout=SENDER_STOP_S)
        if busy:  # closing the database under it would lose what it delivered
            log.warning(
                "still sending to %s after %d s: the deliveries under way are sent again at "
                "the next start", ", ".join(busy), SENDER_STOP_S,
            )  # fmt: skip
        else:
            self.outbox.close()
            self.store.close()
        self.scp.refusals.flush(final=True)  # the refusals counted but not reported yet
        self.audit.close()
        if self._lock >= 0:  # another node may use the folder now
            os.close(self._lock)
            self._lock = -1
        log.info("stopped")


def serve(settings: Settings, load: Callable[[], Settings] | None = None) -> int:
    """Run the node until SIGTERM / SIGINT; SIGHUP reloads the configuration with ``load``."""
    configure_logging(settings.logging)
    # `kill -USR1 <pid>` writes every thread's stack to stderr (the journal): what a node that
    # hangs is waiting for, without stopping it
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    for warning in warnings_of(settings):
        log.warning("configuration: %s", warning)
    problem = unusable_model(settings)
    if problem:
        raise ConfigError(settings.source, [f"model: {problem}"])
    node = Node(settings, load)
    signal.signal(signal.SIGTERM, node.request_stop)
    signal.signal(signal.SIGINT, node.request_stop)
    signal.signal(signal.SIGHUP, node.request_reload)
    try:
        node.start()
        node.run_forever()
    finally:
        node.stop()
    return 0

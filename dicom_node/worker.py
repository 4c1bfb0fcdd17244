"""The job worker: takes queued jobs one at a time and runs each in a child process (forked
from a fork server that imported the job's modules once: :func:`job_context`).

The child converts, predicts, builds the output objects and queues them in the outbox; the
parent waits at most ``worker.job_timeout_s``. A child that runs out of time is killed, one that
dies (out of memory, a crash in native code) is noticed by its exit code: either way the job is
tried again up to ``worker.max_attempts`` times, then fails with the reason. The service itself
never shares the fate of a job.

A job that could not store what it made (the node's disk full, a database or folder that
refuses writes: :class:`~dicom_node.errors.StorageError`, or ENOSPC, EDQUOT, EROFS or EIO) is
not failed: that says nothing about the study, and a failed job would send the PACS a failure
notice and take back the study's earlier results. It is queued again without counting an
attempt, and the worker pauses ``worker.storage_retry_s``, doubled after each such job in a
row up to an hour, so that someone can free the space (logged as an error, and in the metrics).

A job left ``running`` by a stop or crash of the node is queued again at start-up. A job
superseded while it ran (a late instance arrived) does not send its results: the newer version
will. Queueing is idempotent per object and destination, so a job run twice sends once. The
results queued replace, at their destinations, those of the study's earlier jobs (and a notice
of this job's own earlier failure): see "Replacing earlier results" in :mod:`dicom_node.outbox`.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

from dicom_node.errors import GlioforecastError, StorageError
from dicom_node.jobs import DONE, FAILED, QUEUED, SUPERSEDED, JobStore
from dicom_node.loop import BackgroundLoop
from dicom_node.settings import Settings
from dicom_node.types import OUTPUT_KINDS

if TYPE_CHECKING:
    from dicom_node.pipeline import Predictor

log = logging.getLogger(__name__)


#: the outcome of a job that could not store what it made: it waits for the node's storage
WAIT = "wait"

#: errors of the node's storage, not of the study, when they come as a plain OSError
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO})

#: the longest pause of the worker while storage fails (``worker.storage_retry_s`` doubles)
MAX_STORAGE_WAIT_S = 3600.0


@dataclass(frozen=True)
class Outcome:
    state: str  # done, failed, superseded, retry (the attempt died) or wait (storage failed)
    message: str
    queued: int = 0


def make_predictor(settings: Settings) -> Predictor:
    """The configured model, or the "no change" baseline when no model directory is set."""
    model = settings.model
    if model.directory is None:
        from inference.baseline import NoChangeBaseline

        return NoChangeBaseline()
    import torch

    from inference.model_predictor import ModelPredictor

    device = model.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return ModelPredictor(
        model.directory, device, samples=model.samples, guidance_scale=model.guidance_scale
    )


#: how long loading the configured model may take when it is checked (a slow disk, a GPU)
MODEL_CHECK_TIMEOUT_S = 300.0


def _report_model(settings: Settings, conn: Connection) -> None:
    """In a child process: build the predictor a job would build, send '' or why not."""
    try:
        make_predictor(settings)
    except GlioforecastError as exc:
        conn.send(str(exc))
    except Exception as exc:  # a model that breaks the loader itself
        conn.send(f"{type(exc).__name__}: {exc}")
    else:
        conn.send("")
    finally:
        conn.close()


def model_problem(
    settings: Settings,
    timeout_s: float = MODEL_CHECK_TIMEOUT_S,
    waiting: Callable[[], object] | None = None,
) -> str:
    """Why the predictor configured in ``model`` cannot be built ('' when it can, or when no
    model directory is set): built once in a child process as a job would build it (weights
    checked against model.yaml's digests, the networks, the device), since the node's own
    process imports no torch. What start, reload and check-config ask before a model meets
    the studies: otherwise each study's job fails with the reason. ``waiting`` is called
    every second while the child works (the reload pets systemd's watchdog with it)."""
    if settings.model.directory is None:
        return ""
    ctx = job_context(settings)
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_report_model, args=(settings, send), name="model-check")
    child.start()
    send.close()
    deadline = time.monotonic() + timeout_s
    try:
        while not receive.poll(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                return f"the model did not load within {timeout_s:.0f} s"
            if waiting is not None:
                waiting()
        try:
            return str(receive.recv())
        except EOFError:  # the child died without a word
            child.join(10)
            return _death(child.exitcode)
    finally:
        receive.close()
        if child.is_alive():
            child.kill()
        child.join(10)


def unusable_model(settings: Settings, waiting: Callable[[], object] | None = None) -> str:
    """'' when the configured model loads (:func:`model_problem`), else what is wrong, for a
    refused start, reload or check-config."""
    problem = model_problem(settings, waiting=waiting)
    if not problem:
        return ""
    return (
        f"expected a model directory the node can load (device {settings.model.device}), "
        f"found {settings.model.directory}, which does not: {problem}"
    )


def run_job_in_this_process(settings: Settings, job_id: int) -> Outcome:
    """Convert, predict, build and queue the outputs of one job (what the child process does)."""
    try:
        return _run_job(settings, job_id)
    except StorageError as exc:
        return Outcome(WAIT, str(exc))


def _run_job(settings: Settings, job_id: int) -> Outcome:
    from dicom_node.outbox import Outbox, RetryPolicy
    from dicom_node.outbox_cli import outbox_path
    from dicom_node.pipeline import Pipeline

    store = JobStore(settings.storage.database)
    outbox = Outbox(
        outbox_path(settings.storage.data_dir), policy=RetryPolicy.from_settings(settings.sending)
    )
    try:
        destinations = [
            (d.name, [k for k in OUTPUT_KINDS if not d.objects or k in d.objects])
            for d in settings.destinations
        ]
        try:
            pipeline = Pipeline(
                settings, store, settings.storage.spool_dir, make_predictor(settings)
            )
            result = pipeline.run(job_id)
            job = store.get_job(job_id)
            if job is not None and job.state == SUPERSEDED:
                return Outcome(SUPERSEDED, "superseded while it ran; results dropped")
            queued = 0
            replaces = store.replaced_jobs(job_id)  # the study's jobs up to this one
            by_kinds: dict[tuple[str, ...], list[str]] = {}  # destinations taking the same
            for name, kinds in destinations:
                by_kinds.setdefault(tuple(kinds), []).append(name)
            for taken, names in by_kinds.items():
                objects = [ds for kind in taken for ds in result.by_kind.get(kind, [])]
                if objects:
                    queued += outbox.enqueue(objects, names, job=str(job_id), replaces=replaces)
        except StorageError:
            raise  # the node's storage, not the study: the job waits
        except GlioforecastError as exc:
            return Outcome(FAILED, str(exc))
        except Exception as exc:  # a bug must not pass silently: the job says what happened
            if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
                raise StorageError(f"the node could not write: {exc}") from exc
            log.exception("job %d failed unexpectedly", job_id, extra={"job": job_id})
            return Outcome(FAILED, f"internal error: {type(exc).__name__}: {exc}")
        p = result.prediction
        summary = (
            f"{len(result.objects)} objects in {result.series} series by {p.model_name} "
            f"{p.model_version} in {result.seconds:.1f} s; predicted tumour "
            f"{p.predicted_volume_ml:.1f} ml (now {p.current_volume_ml:.1f} ml), "
            f"{p.response_category}; "
            + (
                f"{queued} deliveries queued to "
                + ", ".join(
                    name if len(kinds) == len(OUTPUT_KINDS) else f"{name} ({', '.join(kinds)})"
                    for name, kinds in destinations
                )
                if destinations
                else "no destination configured: nothing sent"
            )
        )
        return Outcome(DONE, summary, queued)
    finally:
        outbox.close()
        store.close()


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent ends (Linux; nothing elsewhere). A job
    process's parent is the fork server, which ends with the node, or the node: a job whose
    node was killed must not go on writing results beside the next node, which runs the job
    again (the node's service kills its whole group; a node run by hand did not)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return


_PR_SET_PDEATHSIG = 1


def _child(settings: Settings, job_id: int, conn: Connection) -> None:
    from dicom_node.service import configure_logging

    die_with_parent()
    configure_logging(settings.logging, job=job_id)
    conn.send(run_job_in_this_process(settings, job_id))
    conn.close()


#: what every job imports: loaded once by the fork server that starts the job processes
JOB_MODULES = (
    "dicom_node.worker", "dicom_node.pipeline", "dicom_node.outbox", "dicom_node.outbox_cli",
    "dicom_node.service", "inference.baseline",
)  # fmt: skip


def job_context(
    settings: Settings,
) -> multiprocessing.context.ForkServerContext | multiprocessing.context.SpawnContext:
    """How job processes start: forked from a fork server, a process started afresh (it
    inherits none of the node's threads, locks or sockets) that imported once what a job needs
    (the model's libraries too when ``model.directory`` is set), so that a job process starts
    in milliseconds, not in the seconds a fresh interpreter takes to import them. Where the
    platform has no fork server, a fresh interpreter per job."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    model = ("torch", "inference.model_predictor") if settings.model.directory else ()
    ctx.set_forkserver_preload([*JOB_MODULES, *model])  # read when the server starts
    return ctx


def _storage_delay(first_s: float, waits: int) -> float:
    """The pause after ``waits`` jobs in a row could not store their results."""
    return min(first_s * 2 ** (waits - 1), max(first_s, MAX_STORAGE_WAIT_S))


def _death(exitcode: int | None) -> str:
    if exitcode is not None and exitcode < 0:
        name = signal.Signals(-exitcode).name
        hint = " (killed: out of memory?)" if -exitcode == signal.SIGKILL else ""
        return f"the job process died of {name}{hint}"
    return f"the job process exited with code {exitcode} without a result"


class Worker(BackgroundLoop):
    thread_name = "job-worker"

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.on_queued = on_queued
        self.child: multiprocessing.process.BaseProcess | None = None
        self._paused_until = 0.0  # monotonic time before which no job starts (storage failed)
        self._storage_waits = 0  # jobs in a row that could not store what they made
        super().__init__()

    @property
    def storage_wait_s(self) -> float:
        """Seconds before jobs start again after a job could not store its results (0: none)."""
        return max(0.0, self._paused_until - time.monotonic())

    def start(self) -> None:
        resumed = self.store.requeue_running()
        if resumed:
            log.warning("%d job(s) interrupted by a stop or crash are queued again", resumed)
        super().start()

    def recover(self) -> None:
        """After a step raised (a database locked by another process, a fork server killed
        as a job started): the job it had taken is queued again, its attempt not counted."""
        if self.store.requeue_running("an error of the node's worker", count_attempt=False):
            log.warning("the job under way when the worker failed is queued again")

    def step(self) -> float:
        if self.storage_wait_s > 0:
            return self.storage_wait_s
        job_id = self.store.claim_next()
        if job_id is None:
            return self.settings.assembly.poll_interval_s
        self.run_job(job_id)
        return 0.0

    def _attempt(self, job_id: int) -> Outcome:
        timeout = self.settings.worker.job_timeout_s
        ctx = job_context(self.settings)
        receiver, sender = ctx.Pipe(duplex=False)
        child = ctx.Process(
            target=_child, args=(self.settings, job_id, sender), name=f"job-{job_id}", daemon=True
        )
        child.start()
        sender.close()
        self.child = child
        try:
            if receiver.poll(timeout):
                try:
                    outcome: Outcome = receiver.recv()
                except EOFError:  # died before it could answer
                    child.join(30)
                    return Outcome("retry", _death(child.exitcode))
                child.join(30)
                return outcome
            child.kill()
            child.join(30)
            return Outcome("retry", f"timed out after {timeout:g} s (worker.job_timeout_s)")
        finally:
            receiver.close()
            self.child = None

    def run_job(self, job_id: int) -> None:
        extra = {"job": job_id}
        log.info("job %d started", job_id, extra=extra)
        started = time.monotonic()
        outcome = self._attempt(job_id)
        if outcome.state == WAIT:
            self._wait_for_storage(job_id, outcome.message)
            return
        self._storage_waits = 0
        if outcome.state == "retry" and self.stopping():
            # the stop reached the job process too (systemd signals the whole group unless
            # KillMode=mixed): not the study's fault, and no job starts again now
            log.warning(
                "job %d interrupted by the node's stop (%s); it runs again at the next start",
                job_id, outcome.message, extra=extra,
            )  # fmt: skip
            self.store.requeue_waiting(
                job_id, f"interrupted by the node's stop ({outcome.message}); runs again at the "
                "next start", event=QUEUED,
            )  # fmt: skip
            return
        if outcome.state == "retry":
            job = self.store.get_job(job_id)
            attempts = job.attempts if job is not None else 0
            if attempts < self.settings.worker.max_attempts:
                log.warning(
                    "job %d attempt %d failed (%s); queued again",
                    job_id, attempts, outcome.message, extra=extra,
                )  # fmt: skip
                self.store.set_state(job_id, QUEUED, f"attempt {attempts}: {outcome.message}")
                return
            outcome = Outcome(FAILED, f"{outcome.message}; gave up after {attempts} attempt(s)")
        if outcome.state == SUPERSEDED:
            log.info("job %d was superseded while it ran; results dropped", job_id, extra=extra)
            self.store.add_event(job_id, SUPERSEDED, outcome.message)
            return
        self.store.set_state(job_id, outcome.state, outcome.message)
        seconds = time.monotonic() - started
        if outcome.state == DONE:
            log.info("job %d done in %.1f s: %s", job_id, seconds, outcome.message, extra=extra)
            if self.on_queued is not None and outcome.queued:
                self.on_queued()
        else:
            log.warning("job %d failed: %s", job_id, outcome.message, extra=extra)

    def _wait_for_storage(self, job_id: int, why: str) -> None:
        """Queue the job again (its attempt not counted) and pause every job a while."""
        self._storage_waits += 1
        delay = _storage_delay(self.settings.worker.storage_retry_s, self._storage_waits)
        self._paused_until = time.monotonic() + delay
        log.error(
            "job %d could not store what it made (%s): the node's storage needs attention; "
            "jobs start again in %.0f s, and the study's earlier results stand",
            job_id, why, delay, extra={"job": job_id},
        )  # fmt: skip
        self.store.requeue_waiting(
            job_id, f"waiting for the node's storage ({why}); runs again in {delay:.0f} s"
        )

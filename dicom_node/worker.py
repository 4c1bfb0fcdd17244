"""The job worker: takes queued jobs one at a time, runs the pipeline, queues the results.

A job left ``running`` by a crash is queued again at start-up. A job superseded while it ran (a
late instance arrived) does not send its results: the newer version will.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from dicom_node.errors import GlioforecastError
from dicom_node.jobs import DONE, FAILED, SUPERSEDED, JobStore
from dicom_node.loop import BackgroundLoop
from dicom_node.outbox import Outbox
from dicom_node.pipeline import Pipeline
from dicom_node.settings import Settings

log = logging.getLogger(__name__)


class Worker(BackgroundLoop):
    thread_name = "job-worker"

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        pipeline: Pipeline,
        outbox: Outbox,
        on_queued: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.pipeline = pipeline
        self.outbox = outbox
        self.on_queued = on_queued
        super().__init__()

    def start(self) -> None:
        resumed = self.store.requeue_running()
        if resumed:
            log.warning("%d job(s) interrupted by a stop or crash are queued again", resumed)
        super().start()

    def step(self) -> float:
        job_id = self.store.claim_next()
        if job_id is None:
            return self.settings.assembly.poll_interval_s
        self.run_job(job_id)
        return 0.0

    def run_job(self, job_id: int) -> None:
        extra = {"job": job_id}
        log.info("job %d started", job_id, extra=extra)
        try:
            result = self.pipeline.run(job_id)
        except GlioforecastError as exc:
            log.warning("job %d failed: %s", job_id, exc, extra=extra)
            self.store.set_state(job_id, FAILED, str(exc))
            return
        except Exception as exc:  # a bug must not stop the worker; the job says what happened
            log.exception("job %d failed unexpectedly", job_id, extra=extra)
            self.store.set_state(job_id, FAILED, f"internal error: {type(exc).__name__}: {exc}")
            return
        job = self.store.get_job(job_id)
        if job is not None and job.state == SUPERSEDED:
            log.info("job %d was superseded while it ran; results dropped", job_id, extra=extra)
            return
        destinations = [d.name for d in self.settings.destinations]
        queued = self.outbox.enqueue(result.objects, destinations, job=str(job_id))
        p = result.prediction
        summary = (
            f"{len(result.objects)} objects in {result.series} series by {p.model_name} "
            f"{p.model_version} in {result.seconds:.1f} s; predicted tumour "
            f"{p.predicted_volume_ml:.1f} ml (now {p.current_volume_ml:.1f} ml), "
            f"{p.response_category}; "
            + (
                f"{queued} deliveries queued to {', '.join(destinations)}"
                if destinations
                else "no destination configured: nothing sent"
            )
        )
        self.store.set_state(job_id, DONE, summary)
        log.info("job %d done: %s", job_id, summary, extra=extra)
        if self.on_queued is not None and queued:
            self.on_queued()

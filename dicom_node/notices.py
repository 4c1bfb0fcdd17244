"""Failure notices: the PACS hears when the node made no prediction for a study.

For destinations with ``failure_notice: true``, a job that fails (a required series missing,
input that cannot be used, a model error) sends the study a notice
(:mod:`sr_writer.notice`: one Secondary Capture page of text and a Comprehensive SR) through the
outbox, like any result: retried while the destination is down, never duplicated.

Which failures get one:

- the job is the study's latest version, failed, and the study is not waiting for more
  instances (a late instance may fix it);
- the study has MR images: a planning CT's study whose RT objects went to the MR study, or a
  study of RT objects only, gets none (its failed job is expected);
- the failure is less than a day old (:data:`WINDOW_S`) when the node first sees it: a node
  turned on with notices, or restarted after a long stop, does not fill the PACS with old ones.

A ``notice`` event on the job records what was done; a job failing again later (``jobs retry``)
gets a notice again, the same objects when the reason is the same.

Whatever the notices, when a study's newer version fails (a late instance, or a series taken
back by a rejection note, left it unusable), the results of its earlier versions no longer
stand: :meth:`FailureNotices.take_back_once` has the outbox take them back at every destination
(and reject those delivered where ``reject_replaced`` is on), as newer results would replace
them. The same one-day window applies; a ``taken-back`` event records it.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node import __version__
from dicom_node.errors import GlioforecastError, StorageError
from dicom_node.jobs import Job, JobStore
from dicom_node.outbox import Outbox
from dicom_node.settings import RetrieveSettings, Settings
from dicom_node.types import SeriesRef

log = logging.getLogger(__name__)

NOTICE_EVENT = "notice"
TAKEN_BACK_EVENT = "taken-back"
#: failures older than this (seconds) when the node first looks at them get no notice
WINDOW_S = 86400.0
#: notices built at most per pass (the pass runs in the assembly loop)
BATCH = 10


def explain(
    reason: str,
    node_ae_title: str,
    taken_back: Sequence[str] = (),
    retrieve: RetrieveSettings | None = None,
    job_id: int | None = None,
    kept_days: float = 0.0,
) -> tuple[str, str]:
    """A headline a reader understands, and what to do, for a job's ``reason`` (the node's own
    messages; anything else gets a general sentence, the reason itself always follows);
    ``taken_back``: the reasons of the rejection notes that took series of the study out of
    use, when there were some; ``retrieve``: how the node asks the PACS for missing RT
    objects; ``job_id`` and ``kept_days`` (``retention.failed_days``, 0: for ever): the job an
    administrator can run again, and for how long the node keeps the study to run it from."""
    send = f"send it to the glioforecast node ({node_ae_title})"
    after = "the study is run again and the prediction follows; this notice then no longer applies"
    admins = "the site's glioforecast administrators"
    if taken_back and "missing required role" in reason:
        return (
            "Series the prediction needs were taken back by the modality or the PACS (IHE "
            f"IOCM rejection: {', '.join(dict.fromkeys(taken_back))}).",
            f"When corrected images are sent to the glioforecast node ({node_ae_title}), the "
            "study is run again and the prediction follows; a prediction made from the series "
            "taken back no longer applies.",
        )
    asked = retrieve is not None and f"; {retrieve.source} was asked for them: " in reason
    if "missing required role rtstruct" in reason and asked:
        assert retrieve is not None
        again = (
            f"the node asks the PACS again every {retrieve.ask_again_h:g} hours for "
            f"{retrieve.ask_again_days:g} days from its first request, and "
            if retrieve.ask_again_h > 0 and retrieve.ask_again_days > 0
            else ""
        )
        return (
            "No RT structure set with the tumour outline (GTV) was received for this study, and "
            "the PACS had none for the patient when the node asked.",
            f"When the GTV has been contoured and stored in the PACS, {again}the study is run "
            "again once it comes (or sooner: send it to the glioforecast node "
            f"({node_ae_title})); the prediction follows and this notice then no longer applies.",
        )
    if "missing required role rtstruct" in reason:
        return (
            "No RT structure set with the tumour outline (GTV) was received for this study.",
            f"When the GTV has been contoured, {send}: {after}.",
        )
    if "missing required role t1c" in reason:
        return (
            "No contrast-enhanced T1-weighted series (T1-Gd) was recognised in this study.",
            f"If the study has one, {send}; if it was sent, ask {admins} to add a rule for its "
            "series description (roles.rules).",
        )
    if reason.startswith("ambiguous role"):
        return (
            "Several series could be the one the prediction needs, and the node does not guess.",
            f"Ask {admins} to tell the series apart (roles.rules, roles.on_ambiguous).",
        )
    if "is on frame of reference" in reason:
        return (
            "The tumour outline or the dose is on another frame of reference than the MR (the "
            "planning CT's), and no registration received relates the two.",
            "Have the planning system send its Spatial Registration of the MR to the CT to the "
            f"glioforecast node ({node_ae_title}): {after}.",
        )
    if "ROI" in reason or "structure set" in reason.lower():
        return (
            "The RT structure set received has no tumour outline (GTV) the node can use.",
            f"Check that the structure set has an approved GTV, then {send}: {after}.",
        )
    if reason.startswith("internal error") or "the job process" in reason or "timed out" in reason:
        job = f" {job_id}" if job_id is not None else ""
        kept = (
            f"for {kept_days:g} days after the failure; after that it must be sent again"
            if kept_days > 0
            else "until they remove it"
        )
        return (
            "The node failed while making the prediction.",
            f"Ask {admins}: they can run the job again (glioforecast jobs retry{job}) from the "
            f"study the node keeps {kept}.",
        )
    return (
        "The study's images could not be used for a prediction.",
        f"The reason says what was expected and what was found; ask {admins} if it is not clear.",
    )


class FailureNotices:
    """Builds and queues the notices of failed jobs (:meth:`run_once`, from the node's loop)."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        outbox: Outbox,
        wake_sender: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.store = store
        self.outbox = outbox
        self.wake_sender = wake_sender
        self.clock = clock

    @property
    def destinations(self) -> list[str]:
        """The destinations that take failure notices (read at each pass: a configuration
        reload may change them)."""
        return [d.name for d in self.settings.destinations if d.failure_notice]

    @property
    def enabled(self) -> bool:
        return bool(self.destinations)

    def run_once(self) -> int:
        """Queue the notices due now; returns how many jobs got one."""
        if not self.enabled:
            return 0
        sent = 0
        for job in self.store.failures_to_notify(self.clock() - WINDOW_S, BATCH):
            try:
                message = self._notify(job)
            except GlioforecastError as exc:
                message = f"no failure notice: {exc}"
                log.warning("job %d: %s", job.id, message, extra={"job": job.id})
            except Exception as exc:  # recorded, so that the next pass does not try it again
                message = f"no failure notice: internal error: {type(exc).__name__}: {exc}"
                log.exception("job %d: failure notice not built", job.id, extra={"job": job.id})
            else:
                sent += message.startswith("failure notice queued")
            self.store.add_event(job.id, NOTICE_EVENT, message)
        if sent:
            self.wake_sender()
        return sent

    def take_back_once(self) -> int:
        """Have the outbox take back the earlier results of studies whose newer version failed;
        returns how many jobs were handled."""
        names = [d.name for d in self.settings.destinations]
        if not names:
            return 0
        jobs = self.store.failures_to_take_back(self.clock() - WINDOW_S, BATCH)
        for job in jobs:
            earlier = [j for j in self.store.replaced_jobs(job.id) if j != str(job.id)]
            try:
                self.outbox.take_back(
                    names, str(job.id), earlier,
                    "The study changed after these results were made (a late series, or a "
                    "series taken back), and the node could make no prediction from it",
                )  # fmt: skip
            except StorageError:  # the earlier versions queued nothing
                message = (
                    "nothing to take back: the outbox has no record of results of the study's "
                    f"earlier versions (jobs {', '.join(earlier)})"
                )
            else:
                message = (
                    f"the study's earlier results (jobs {', '.join(earlier)}) no longer stand: "
                    f"taken back at {', '.join(names)}"
                )
            self.store.add_event(job.id, TAKEN_BACK_EVENT, message)
        if jobs:
            self.wake_sender()
        return len(jobs)

    def _notify(self, job: Job) -> str:
        from dicom_node.pipeline import patient_study
        from sr_writer.notice import FailureNotice, build_failure_notice

        instances = self.store.job_instances(job.id)
        images = [
            js.series
            for js in self.store.job_series(job.id)
            if js.series.modality == "MR" and instances.get(js.series.series_instance_uid)
        ]
        if not images:
            return "no failure notice: the study has no MR images in the spool"
        header = self._header(
            [self.settings.storage.spool_dir / rel for s in images
             for _, rel in instances[s.series_instance_uid][:1]]
        )  # fmt: skip
        if header is None:
            return "no failure notice: none of the study's MR images can be read"
        headline, advice = explain(
            job.reason,
            self.settings.node.ae_title,
            self.store.rejection_reasons(job.study_instance_uid),
            self.settings.retrieve if self.settings.retrieve.source else None,
            job.id,
            self.settings.retention.failed_days,
        )
        notice = FailureNotice(
            job_id=job.id,
            headline=headline,
            reason=job.reason or "no reason was recorded",
            advice=advice,
            node_ae_title=self.settings.node.ae_title,
            failed_at=datetime.datetime.fromtimestamp(job.updated_at).replace(microsecond=0),
            study_series=tuple(
                SeriesRef(
                    s.series_instance_uid,
                    s.sop_class_uid,
                    tuple(uid for uid, _ in instances[s.series_instance_uid]),
                    s.modality,
                    s.series_description,
                    s.series_number,
                )
                for s in images
            ),
            study_version=job.version,
        )
        objects = build_failure_notice(notice, patient_study(header), __version__)
        # a notice replaces the job's own earlier notice (another reason); the results of the
        # study's earlier versions are taken back by take_back_once, at every destination
        added = self.outbox.enqueue(
            objects, self.destinations, job=str(job.id), replaces=[str(job.id)]
        )
        log.info(
            "job %d: failure notice queued to %s (%d new deliveries)",
            job.id, ", ".join(self.destinations), added, extra={"job": job.id},
        )  # fmt: skip
        return (
            f"failure notice queued to {', '.join(self.destinations)} "
            f"({len(objects)} objects, {added} new deliveries): {headline}"
        )

    @staticmethod
    def _header(paths: Sequence[Path]) -> Dataset | None:
        """The header of the first of ``paths`` that reads (None when none does)."""
        for path in paths:
            try:
                return dcmread(path, stop_before_pixels=True)
            except (InvalidDicomError, OSError, ValueError, AttributeError):
                continue
        return None

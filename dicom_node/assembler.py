"""Study assembly: a study becomes a job once no instance has arrived for the quiet period and
the association that brought its instances has ended (or sent none of them for
:data:`ARRIVING_HOLD_S`).

A late instance marks the study pending again; after another quiet period a new job version is
created with every instance of the study, and the earlier version is superseded. A study with a
T1-Gd and no structure set may take the RT objects of another study of the patient (the
planning CT's study), and an RT study arriving later reopens the MR studies it belongs to
(:mod:`dicom_node.linking`). A study with a T1-Gd that still lacks its RT objects waits for
the PACS in ``retrieve.source`` to send them (:mod:`dicom_node.retrieve`) instead of failing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from dicom_node import retrieve
from dicom_node.jobs import FAILED, QUEUED, RETRIEVING, JobStore, SeriesSummary
from dicom_node.linking import RT_CLASSES, RT_ROLES, Linker
from dicom_node.roles import RoleOutcome, assign_roles
from dicom_node.settings import Settings

log = logging.getLogger(__name__)

#: how long after its last instance a study whose sender's association is still open waits
#: for that association to end, however long the quiet period has been: a sender that pauses
#: mid-study (a PACS fetching from its archive) goes on; one that keeps its association open
#: for other studies does not hold this one longer
ARRIVING_HOLD_S = 300.0


class Assembler:
    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        arriving: Callable[[float], dict[str, float]] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        #: the studies an open association stored an instance of within the given seconds,
        #: with how long ago (:meth:`~dicom_node.scp.StorageSCP.studies_arriving`): not made a
        #: job yet
        self.arriving = arriving
        #: the studies said to wait for their sender's association (said once each)
        self.held: set[str] = set()
        self.linker = Linker(store, settings.storage.spool_dir)
        #: studies that could not be made a job, with the passes that failed
        self.failing: dict[str, int] = {}
        #: no study becomes a job before this time (the node's start and a quiet period)
        self.not_before = -math.inf

    def run_once(self, now: float | None = None) -> list[int]:
        """Turn every study that has been quiet long enough into a job; return the job ids.

        A study that cannot be made a job (a fault of the node's, such as its database
        refusing what the study asks of it: a study's own problems make a failed job with a
        reason) stays pending and is tried again at each pass, logged once with its traceback
        (:attr:`failing`); the studies after it go on. Before, such a study failed the whole
        pass, every pass: no study became a job again."""
        now = time.time() if now is None else now
        if now < self.not_before:
            return []
        created = []
        quiet = self.settings.assembly.quiet_period_s
        due = self.store.due_studies(now, quiet)
        for gone in set(self.failing) - set(due):  # removed since (retention, a reset)
            del self.failing[gone]
        hold = max(quiet, ARRIVING_HOLD_S)
        arriving = self.arriving(hold) if due and self.arriving is not None else {}
        waiting = set(due) & set(arriving)
        for study in sorted(waiting - self.held):
            log.info(
                "study %s waits for the association still sending it (its last instance "
                "%.0f s ago): made a job once it ends, or %.0f s after its last instance",
                study, arriving[study], hold,
            )  # fmt: skip
        self.held = waiting  # a study held again later (new instances, a pause) is said again
        due = [study for study in due if study not in waiting]
        for study_uid in due:
            try:
                created.append(self._assemble(study_uid, now))
            except Exception as exc:
                if study_uid not in self.failing:
                    log.exception(
                        "study %s could not be made a job; it stays pending and is tried again "
                        "at each pass (the other studies go on): %s", study_uid, exc,
                    )  # fmt: skip
                self.failing[study_uid] = self.failing.get(study_uid, 0) + 1
                continue
            tries = self.failing.pop(study_uid, None)
            if tries is not None:
                log.info("study %s made a job after %d failed passes", study_uid, tries)
        return created

    def _assemble(self, study_uid: str, now: float) -> int:
        """Make one study a job; its id."""
        series = self.store.series_of_study(study_uid)
        outcome = assign_roles(series, self.settings.roles)
        linked, note, linked_from = self._link(study_uid, series, outcome, now)
        if linked:
            outcome = assign_roles([*series, *linked], self.settings.roles)
        state = QUEUED if outcome.ok else FAILED
        reason = "; ".join([*outcome.problems, *([note] if note and not outcome.ok else [])])
        if not outcome.ok:
            state, reason = self._retrieval(study_uid, outcome, reason)
        removed_at = self.store.study_removed_at(study_uid)
        if not outcome.ok and removed_at is not None:
            reason += (
                "; the study's earlier instances were removed from the spool by retention on "
                f"{time.strftime('%Y-%m-%d', time.localtime(removed_at))}: send the whole "
                "study again"
            )
        job_id = self.store.create_job(
            study_uid, outcome.decisions, state, reason,
            [s.series_instance_uid for s in linked],
        )  # fmt: skip
        if note:
            self.store.add_event(job_id, "linked", note)
        if linked_from:  # the RT study's own (failed) job says where its objects went
            self.store.add_event(
                self.store.latest_job_id(linked_from), "linked",
                f"its RT objects are used by job {job_id} of the patient's study {study_uid}",
            )  # fmt: skip
        roles = ", ".join(sorted({d.role for d in outcome.decisions if d.role})) or "none"
        log.info(
            "job %d created: %d series, roles %s; %s%s",
            job_id,
            len(series),
            roles,
            state,
            f" ({reason})" if reason else "",
            extra={"job": job_id},
        )
        return job_id

    def _retrieval(self, study_uid: str, outcome: RoleOutcome, reason: str) -> tuple[str, str]:
        """The state and reason of a job whose study lacks required roles: ``retrieving`` when
        the PACS can be asked for them (only RT roles missing, a T1-Gd present, a source
        configured, not asked yet for the study: :mod:`dicom_node.retrieve`), else failed, the
        reason saying what an earlier retrieval found."""
        source = self.settings.retrieve.source
        if not source:
            return FAILED, reason
        asked = self.store.retrieval_outcome(study_uid)
        if asked is not None:
            return FAILED, retrieve.asked(reason, source, asked)
        retrievable = (
            outcome.missing
            and set(outcome.missing) <= set(RT_ROLES)
            and len(outcome.problems) == len(outcome.missing)
            and any(d.role == "t1c" for d in outcome.decisions)
        )
        if not retrievable:
            return FAILED, reason
        return RETRIEVING, retrieve.asking(reason, source)

    def _link(
        self, study_uid: str, series: list[SeriesSummary], outcome: RoleOutcome, now: float
    ) -> tuple[list[SeriesSummary], str, str]:
        """RT series of another study of the patient for this one (:mod:`dicom_node.linking`),
        a note saying what was linked or reopened, and the study linked from ("" if none)."""
        days = self.settings.assembly.link_rt_days
        if days <= 0:
            return [], "", ""
        roles = {d.series_instance_uid: d.role for d in outcome.decisions}
        by_role = {roles[s.series_instance_uid]: s for s in series if roles[s.series_instance_uid]}
        since = now - days * 86400.0
        if "t1c" in by_role and "rtstruct" not in by_role:
            found = self.linker.rt_series_for(
                study_uid, {by_role["t1c"].frame_of_reference_uid}, series, since
            )
            if found is None:
                return [], "", ""
            other, rt = found
            note = (
                f"RT objects linked from the patient's study {other} "
                f"({len(rt)} series: structure set, dose and registrations)"
            )
            return rt, note, other
        if "rtstruct" in by_role and "t1c" not in by_role:
            rt = [s for s in series if s.sop_class_uid in RT_CLASSES]
            reopened = self.linker.mr_studies_for(study_uid, rt, since, self.settings.roles)
            for other in reopened:
                self.store.reopen(
                    other, f"reopened: the patient's RT objects arrived in study {study_uid}"
                )
            if reopened:
                return (
                    [],
                    (
                        f"its RT objects are used by the patient's MR study {', '.join(reopened)}, "
                        "reopened to run with them"
                    ),
                    "",
                )
        return [], "", ""

    def retry(self, job_id: int) -> str:
        """Re-evaluate the roles of a failed job with the current rules and re-queue it."""
        job = self.store.get_job(job_id)
        if job is None:
            raise KeyError(job_id)
        if job.state != FAILED:
            raise ValueError(f"job {job_id}: expected a failed job to retry, found {job.state}")
        if not self.store.job_instances(job_id):
            raise ValueError(
                f"job {job_id}: its instances are no longer in the spool (removed by retention): "
                "send the study again"
            )
        series = [js.series for js in self.store.job_series(job_id)]
        outcome = assign_roles(series, self.settings.roles)
        state = QUEUED if outcome.ok else FAILED
        self.store.set_roles(job_id, outcome.decisions, state, "; ".join(outcome.problems))
        return state

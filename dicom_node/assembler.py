"""Study assembly: a study becomes a job once no instance has arrived for the quiet period.

A late instance marks the study pending again; after another quiet period a new job version is
created with every instance of the study, and the earlier version is superseded.
"""

from __future__ import annotations

import logging
import time

from dicom_node.jobs import FAILED, QUEUED, JobStore
from dicom_node.roles import assign_roles
from dicom_node.settings import Settings

log = logging.getLogger(__name__)


class Assembler:
    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def run_once(self, now: float | None = None) -> list[int]:
        """Turn every study that has been quiet long enough into a job; return the job ids."""
        now = time.time() if now is None else now
        created = []
        for study_uid in self.store.due_studies(now, self.settings.assembly.quiet_period_s):
            series = self.store.series_of_study(study_uid)
            outcome = assign_roles(series, self.settings.roles)
            state = QUEUED if outcome.ok else FAILED
            reason = "; ".join(outcome.problems)
            removed_at = self.store.study_removed_at(study_uid)
            if not outcome.ok and removed_at is not None:
                reason += (
                    "; the study's earlier instances were removed from the spool by retention on "
                    f"{time.strftime('%Y-%m-%d', time.localtime(removed_at))}: send the whole "
                    "study again"
                )
            job_id = self.store.create_job(study_uid, outcome.decisions, state, reason)
            created.append(job_id)
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
        return created

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

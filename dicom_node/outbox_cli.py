"""``glioforecast outbox list|retry``: look at the outbox and re-queue dead deliveries.

The CLI wires :func:`register` into its sub-commands; ``args.data_dir`` (a Path) names the data
folder, and the outbox database is ``<data_dir>/outbox.sqlite3``. Output names objects by SOP
Instance UID and job id only, never by patient.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
from pathlib import Path
from typing import Any

from dicom_node.argtypes import row_id
from dicom_node.errors import StorageError
from dicom_node.outbox import STATES, Outbox, OutboxItem

logger = logging.getLogger(__name__)

OUTBOX_FILE = "outbox.sqlite3"


def outbox_path(data_dir: Path) -> Path:
    return Path(data_dir) / OUTBOX_FILE


def register(subparsers: Any) -> None:
    """Add ``outbox list``, ``outbox retry`` and ``outbox abandon`` to an argparse sub-parsers
    object."""
    outbox = subparsers.add_parser("outbox", help="list or re-queue result deliveries")
    osub = outbox.add_subparsers(dest="outbox_command", required=True)

    p = osub.add_parser("list", help="list deliveries (object x destination) and their state")
    p.add_argument("--state", choices=STATES, help="only rows in this state")
    p.add_argument("--destination", help="only rows for this destination name")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_list)

    p = osub.add_parser("retry", help="re-queue dead deliveries for an attempt now")
    p.add_argument("--destination", help="only rows for this destination name")
    p.add_argument("--id", type=row_id, action="append", dest="ids", help="only this row (repeat)")
    p.add_argument(
        "--pending",
        action="store_true",
        help="also reset pending rows waiting for their back-off, to try them now",
    )
    p.add_argument(
        "--committing",
        action="store_true",
        help="also ask again now for the storage commitments still awaited (the PACS's "
        "report was lost, e.g. while the node was down)",
    )
    p.set_defaults(func=cmd_retry)

    p = osub.add_parser(
        "abandon",
        help="give up dead deliveries for good (withdrawn: their study's files may then go at "
        "retention)",
    )
    p.add_argument("--destination", help="only rows for this destination name")
    p.add_argument("--id", type=row_id, action="append", dest="ids", help="only this row (repeat)")
    p.add_argument("--reason", required=True, help="why, in words (kept with each row)")
    p.set_defaults(func=cmd_abandon)


def _open(args: argparse.Namespace) -> Outbox | None:
    data_dir = getattr(args, "data_dir", None)
    if data_dir is None:
        logger.error("no data folder: expected --data-dir or storage.data_dir, found none")
        return None
    path = outbox_path(Path(data_dir))
    if not path.is_file():
        logger.error("no outbox at %s (nothing was ever queued in this data folder)", path)
        return None
    return Outbox(path)


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M:%S")


def _next_attempt(item: OutboxItem) -> str:
    """When the row is tried next: a send (pending) or a storage commitment request
    (committing); "awaiting report" once the request was made."""
    if item.state == "pending":
        return _fmt_time(item.next_attempt_at)
    if item.state == "committing":
        if item.commit_requested_at is None:
            return _fmt_time(item.next_attempt_at)
        return "awaiting report"
    return "-"


def _row(item: OutboxItem) -> dict[str, object]:
    return {
        "id": item.id,
        "state": item.state,
        "destination": item.destination,
        "attempts": item.attempts,
        "next_attempt": _next_attempt(item),
        "sent": _fmt_time(item.sent_at),
        "commitment_requests": item.commit_requests,
        "commitment_requested": _fmt_time(item.commit_requested_at),
        "committed": _fmt_time(item.committed_at),
        "job": item.job,
        "sop_instance_uid": item.sop_instance_uid,
        "sop_class_uid": item.sop_class_uid,
        "last_status": None if item.last_status is None else f"0x{item.last_status:04X}",
        "last_error": item.last_error or "",
    }


def cmd_list(args: argparse.Namespace) -> int:
    try:
        outbox = _open(args)
        if outbox is None:
            return 2
        with outbox:
            items = outbox.items(state=args.state, destination=args.destination)
            counts = outbox.counts()
    except StorageError as exc:
        logger.error("%s", exc)
        return 1
    if args.json:
        for item in items:
            print(json.dumps(_row(item), ensure_ascii=False))
        return 0
    header = f"{'id':>6}  {'state':<10} {'destination':<16} {'tries':>5}  {'next attempt':<19}  "
    print(header + "job / SOP instance / last error")
    for item in items:
        r = _row(item)
        print(
            f"{r['id']:>6}  {r['state']:<10} {r['destination']!s:<16} {r['attempts']:>5}  "
            f"{r['next_attempt']!s:<19}  {r['job']} {r['sop_instance_uid']}"
            + (f"  [{r['last_error']}]" if r["last_error"] else "")
        )
    totals = ", ".join(
        f"{dest}: " + " ".join(f"{s}={n}" for s, n in sorted(by_state.items()))
        for dest, by_state in sorted(counts.items())
    )
    print(f"{len(items)} rows shown; {totals or 'outbox empty'}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    try:
        outbox = _open(args)
        if outbox is None:
            return 2
        with outbox:
            states = (
                ("dead",)
                + (("pending",) if args.pending else ())
                + (("committing",) if args.committing else ())
            )
            known = sorted(outbox.counts())
            if args.destination is not None and args.destination not in known:
                logger.error(
                    "no delivery to %r in the outbox: expected one of %s", args.destination,
                    ", ".join(known) or "none (the outbox is empty)",
                )  # fmt: skip
                return 1
            n = outbox.retry(destination=args.destination, ids=args.ids, states=states)
    except StorageError as exc:
        logger.error("%s", exc)
        return 1
    print(f"{n} deliveries re-queued")
    if not n and args.ids:
        logger.error("none of the rows %s is a delivery in state %s (outbox list shows them)",
                     ", ".join(map(str, args.ids)), " or ".join(states))  # fmt: skip
        return 1
    return 0


def cmd_abandon(args: argparse.Namespace) -> int:
    if args.destination is None and not args.ids:
        logger.error("outbox abandon: expected --destination or --id, found neither (it gives "
                     "up deliveries for good: name them)")  # fmt: skip
        return 2
    try:
        outbox = _open(args)
        if outbox is None:
            return 2
        with outbox:
            n = outbox.abandon(args.reason, destination=args.destination, ids=args.ids)
    except (StorageError, ValueError) as exc:
        logger.error("%s", exc)
        return 1
    print(f"{n} dead deliveries abandoned")
    if not n:
        logger.error("no dead delivery matches (outbox list --state dead shows them)")
        return 1
    return 0

"""A Query/Retrieve SCP (pynetdicom, run as its own process) that answers what dcmqrscp and
Orthanc do not. Arguments: port, move destination port, folder of the files it holds, mode:

- ``no-counts``: a C-MOVE's final success without the sub-operation counts, as PS3.4
  C.4.2.1.6 allows and some PACS do;
- ``refuse-find``: every C-FIND answered 0xA900 with an Error Comment quoting the Patient ID
  asked for, as some PACS do."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as FIND,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelMove as MOVE,
)
from pynetdicom.sop_class import Verification

_send = DIMSEServiceProvider.send_msg


def _without_counts(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    if isinstance(primitive, C_MOVE) and primitive.Status == 0x0000:
        primitive.NumberOfCompletedSuboperations = None
        primitive.NumberOfFailedSuboperations = None
        primitive.NumberOfWarningSuboperations = None
    _send(self, primitive, context_id)


def matches(query: Dataset, held: list[Dataset]) -> Iterator[Dataset]:
    """What a Study Root C-FIND at STUDY or SERIES level finds among ``held``: one match per
    study or series (of the query's study), with the query's keys that the instance has."""
    seen: set[str] = set()
    for ds in held:
        level = query.QueryRetrieveLevel
        if level == "SERIES" and ds.StudyInstanceUID != query.StudyInstanceUID:
            continue
        key = ds.StudyInstanceUID if level == "STUDY" else ds.SeriesInstanceUID
        if key in seen:
            continue
        seen.add(key)
        match = Dataset()
        match.QueryRetrieveLevel = level
        for keyword in query.dir():
            if keyword in ds and keyword != "QueryRetrieveLevel":
                setattr(match, keyword, ds.data_element(keyword).value)
        yield match


def main() -> None:
    port, move_port, folder = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    mode = sys.argv[4]
    held = [dcmread(p) for p in sorted(folder.rglob("*.dcm"))]
    if mode == "no-counts":
        DIMSEServiceProvider.send_msg = _without_counts  # type: ignore[method-assign]

    def find(event: evt.Event) -> Iterator[tuple[Any, Dataset | None]]:
        query = event.identifier
        if mode == "refuse-find":
            status = Dataset()
            status.Status = 0xA900
            status.ErrorComment = f"Unknown patient {query.PatientID}"
            yield status, None
            return
        for match in matches(query, held):
            if "ModalitiesInStudy" in query:
                match.ModalitiesInStudy = sorted({str(d.Modality) for d in held})
            yield 0xFF00, match
        yield 0x0000, None

    def move(event: evt.Event) -> Iterator[Any]:
        wanted = [d for d in held if d.SeriesInstanceUID == event.identifier.SeriesInstanceUID]
        yield "127.0.0.1", move_port
        yield len(wanted)
        for ds in wanted:
            yield 0xFF00, ds

    ae = AE(ae_title="FAKEQR")
    for context in (FIND, MOVE, Verification):
        ae.add_supported_context(context)
    for ds in held:
        ae.add_requested_context(ds.SOPClassUID)
    ae.start_server(
        ("127.0.0.1", port), evt_handlers=[(evt.EVT_C_FIND, find), (evt.EVT_C_MOVE, move)]
    )


if __name__ == "__main__":
    main()

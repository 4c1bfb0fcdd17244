"""Results to a DICOMweb service: STOW-RS (PS3.18 10.5), for a destination with ``dicomweb.url``;
and, when it is ``retrieve.source``, the RT objects a study lacks from it: QIDO-RS searches and
WADO-RS retrievals (:func:`qido`, :func:`wado_series`, used by :mod:`dicom_node.retrieve`).

:func:`stow_batch` keeps the contract of :func:`dicom_node.scu.store_batch`: one
:class:`~dicom_node.scu.StoreResult` per object, :class:`SendError` when the service cannot be
reached at all, so the outbox retries, marks dead and audits exactly as for a DICOM
destination. Objects go as Part 10 files in ``multipart/related; type="application/dicom"``
requests to ``{url}/studies``, at most :data:`CHUNK` per request. The answer is read as
PS3.18 says:

- 200: every object stored (but an HTML page is no STOW-RS answer: a proxy's login page);
- otherwise, when the answer is a STOW-RS response data set (202 and 409 as the standard
  has it; Orthanc's plugin answers a partial success 400 with one): the objects in its
  Referenced SOP Sequence are stored (a Warning Reason is logged), those in its Failed SOP
  Sequence are not, with their Failure Reason (a C-STORE status: whether retrying can help is
  decided as for DICOM);
- objects the answer does not mention, or every object when there is no response data set:
  after 401, 403, 404, 405, 409, 413, 415 and other 4xx, not stored, and retrying cannot help
  until the configuration changes (dead at once; ``outbox retry`` after the fix); after 202,
  408, 429, 5xx, a timeout or a lost connection, tried again with back-off.

Redirects are not followed (a 3xx fails the objects until ``dicomweb.url`` is set where it points):
urllib would follow a POST's 302 as a bodiless GET, whose 200 would count the objects stored,
and take the credentials to another host.

Authentication is a bearer token or HTTP Basic (``dicomweb.token_file``, or ``username`` and
``password_file``); https uses the destination's ``tls`` files (the system's CAs otherwise).
"""

from __future__ import annotations

import http.client
import io
import json
import logging
import re
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Sequence

from pydicom import dcmwrite
from pydicom.dataset import Dataset

from dicom_node.errors import SendError
from dicom_node.scu import Destination, StoreResult, describe_status, is_permanent

log = logging.getLogger(__name__)

#: objects per STOW-RS request: a request is built in memory
CHUNK = 50
REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"
#: HTTP statuses after which the same request may succeed later
RETRYABLE = frozenset({408, 425, 429})


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def multipart(datasets: Sequence[Dataset]) -> tuple[bytes, str]:
    """The body of a STOW-RS request and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = []
    for ds in datasets:
        parts.append(
            f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + _part10(ds)
        )
    body = b"\r\n".join(parts) + f"\r\n--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _context(destination: Destination) -> ssl.SSLContext | None:
    return destination.tls if destination.url.startswith("https:") else None


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are answered, not followed: urllib follows a POST's 302 or 303 as a GET without
    its body (whose 200 read as the upload's: results counted stored that were not), and sends
    the Authorization header wherever the Location points, another host included."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


def request(
    destination: Destination, path: str, *, data: bytes | None = None, headers: dict[str, str]
) -> tuple[int, str, bytes, str]:
    """One HTTP request to ``destination``: (status, reason, body, content type). SendError
    when it cannot be made (no connection, TLS, timeout). A redirect is not followed: its
    status comes back, the reason naming where it points."""
    req = urllib.request.Request(
        destination.url + path, data=data, method="POST" if data is not None else "GET"
    )
    for key, value in headers.items():
        req.add_header(key, value)
    if destination.authorization:
        req.add_header("Authorization", destination.authorization)
    opener = urllib.request.build_opener(
        _NoRedirects, urllib.request.HTTPSHandler(context=_context(destination))
    )
    try:
        with opener.open(req, timeout=destination.timeout_s) as rsp:
            return int(rsp.status), str(rsp.reason), rsp.read(), rsp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        reason = str(exc.reason)
        if 300 <= exc.code < 400:
            where = exc.headers.get("Location", "") if exc.headers else ""
            reason += (
                f" (a redirect to {where or 'nowhere'}: not followed, the node sends results "
                "and credentials only to dicomweb.url; set it to the address that answers)"
            )
        content_type = exc.headers.get("Content-Type", "") if exc.headers else ""
        return int(exc.code), reason, exc.read(), content_type
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        cause = getattr(exc, "reason", exc)
        raise SendError(f"cannot reach {destination}: {cause}") from exc


def _items(answer: dict[str, object], tag: str) -> list[dict[str, object]]:
    element = answer.get(tag)
    if not isinstance(element, dict):
        return []
    value = element.get("Value")
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _value(item: dict[str, object], tag: str) -> object:
    element = item.get(tag)
    if isinstance(element, dict):
        value = element.get("Value")
        if isinstance(value, list) and value:
            return value[0]
    return None


def _answer(body: bytes) -> dict[str, object]:
    """The STOW-RS response data set (application/dicom+json); {} when there is none."""
    try:
        answer = json.loads(body or b"{}")
    except ValueError:
        return {}
    if isinstance(answer, list):  # some services answer a one-element array
        answer = answer[0] if answer else {}
    return answer if isinstance(answer, dict) else {}


def _stow(datasets: Sequence[Dataset], destination: Destination) -> list[StoreResult]:
    body, content_type = multipart(datasets)
    status, reason, raw, answered_as = request(
        destination, "/studies", data=body,
        headers={"Content-Type": content_type, "Accept": "application/dicom+json"},
    )  # fmt: skip
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    if status == 200 and answered_as.split(";")[0].strip().lower() == "text/html":
        # a web page is no STOW-RS answer: a proxy's or a single sign-on's login page
        why = (
            f"{destination} answered HTTP 200 with an HTML page, not a STOW-RS response (a "
            "proxy or login page in front of the service?): nothing is taken as stored"
        )
        return [StoreResult(uid, None, why, permanent=True) for uid in uids]
    if status == 200:
        return [StoreResult(uid, 0x0000) for uid in uids]
    answer = _answer(raw)  # a 400 may carry one too (Orthanc's plugin answers a partial so)
    failed: dict[str, int] = {}  # the objects refused, with a Failure Reason
    for item in _items(answer, FAILED_SOP_SEQUENCE):
        code = _value(item, FAILURE_REASON)
        if isinstance(code, int):
            failed[str(_value(item, REFERENCED_SOP_INSTANCE_UID))] = code
    stored = set()
    for item in _items(answer, REFERENCED_SOP_SEQUENCE):
        stored.add(str(_value(item, REFERENCED_SOP_INSTANCE_UID)))
        warning = _value(item, WARNING_REASON)
        if warning is not None:
            log.warning(
                "STOW-RS to %s: warning 0x%04X for %s (stored)",
                destination.name, int(str(warning)), _value(item, REFERENCED_SOP_INSTANCE_UID),
            )  # fmt: skip
    http_text = f"{destination} answered HTTP {status} {reason}".rstrip()
    results = []
    for uid in uids:
        if uid in stored:
            results.append(StoreResult(uid, 0x0000))
        elif uid in failed:
            code = failed[uid]
            results.append(
                StoreResult(
                    uid, code, f"{http_text}: 0x{code:04X} ({describe_status(code)})",
                    permanent=is_permanent(code),
                )
            )  # fmt: skip
        else:
            detail = "" if answer else f": {raw[:200].decode('utf-8', 'replace')}"
            retry = status >= 500 or status in RETRYABLE or status == 202
            results.append(StoreResult(uid, None, f"{http_text}{detail}", permanent=not retry))
    return results


def stow_batch(
    datasets: Sequence[Dataset],
    destination: Destination,
    *,
    chunk: int = CHUNK,
    stopping: Callable[[], bool] | None = None,
) -> list[StoreResult]:
    """Send ``datasets`` to a DICOMweb ``destination``, one result per dataset. SendError when
    the first request cannot be made; a connection lost later fails the objects not yet
    answered, which are tried again. When ``stopping`` says so, the chunks not sent yet are
    left out of the results, as :func:`~dicom_node.scu.store_batch` does."""
    results: list[StoreResult] = []
    for start in range(0, len(datasets), chunk):
        if stopping is not None and stopping():
            break
        part = datasets[start : start + chunk]
        try:
            results += _stow(part, destination)
        except SendError as exc:
            if not results:
                raise
            results += [
                StoreResult(str(ds.SOPInstanceUID), None, str(exc)) for ds in datasets[start:]
            ]
            break
    delivered = sum(r.delivered for r in results)
    log.info("STOW-RS to %s: %d of %d delivered", destination.name, delivered, len(results))
    return results


def check(destination: Destination) -> tuple[bool, str]:
    """Whether the DICOMweb ``destination`` answers, as ``check-destinations`` reports it: a
    QIDO-RS search for one study with its authentication (nothing is stored)."""
    try:
        status, reason, *_ = request(
            destination, "/studies?limit=1", headers={"Accept": "application/dicom+json"}
        )
    except SendError as exc:
        return False, str(exc)
    if status in (200, 204):
        return True, f"DICOMweb answers (QIDO-RS HTTP {status})"
    return False, f"DICOMweb answered HTTP {status} {reason} to a QIDO-RS search"


# ---------------------------------------------------------------- retrieving (QIDO-RS, WADO-RS)


class AnswerError(SendError):
    """The service answered a search or a retrieval with an error: ``status`` is the HTTP
    status (0 when the answer could not be read)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status

    @property
    def permanent(self) -> bool:
        """Whether asking again cannot help until the configuration changes."""
        return 400 <= self.status < 500 and self.status not in RETRYABLE


def qido(destination: Destination, path: str, params: Sequence[tuple[str, str]]) -> list[Dataset]:
    """A QIDO-RS search (PS3.18 10.6) at ``path`` (``/studies``, ``/studies/{uid}/series``):
    the matches as data sets."""
    where = f"{path}?{urllib.parse.urlencode(params)}"
    status, reason, body, _ = request(
        destination, where, headers={"Accept": "application/dicom+json"}
    )
    if status == 204:
        return []
    if status != 200:
        raise AnswerError(
            f"{destination} answered the QIDO-RS search {where} with HTTP {status} {reason}",
            status,
        )
    try:
        found = json.loads(body or b"[]")
        if not isinstance(found, list):
            raise ValueError(f"a JSON {type(found).__name__}")
        return [Dataset.from_json(item) for item in found if isinstance(item, dict)]
    except (ValueError, TypeError, KeyError) as exc:
        raise AnswerError(
            f"{destination} answered the QIDO-RS search {where} with something that is not "
            f"an array of DICOM JSON data sets: {exc}",
            0,
        ) from exc


def wado_series(destination: Destination, study: str, series: str) -> list[bytes]:
    """A WADO-RS retrieval of one series (PS3.18 10.4): its instances as Part 10 files."""
    where = f"/studies/{study}/series/{series}"
    status, reason, body, content_type = request(
        destination, where, headers={"Accept": 'multipart/related; type="application/dicom"'}
    )
    if status != 200:
        raise AnswerError(
            f"{destination} answered the WADO-RS retrieval {where} with HTTP {status} {reason}",
            status,
        )
    try:
        return multipart_parts(body, content_type)
    except ValueError as exc:
        raise AnswerError(
            f"{destination} answered the WADO-RS retrieval {where} with {exc}", 0
        ) from exc


def multipart_parts(body: bytes, content_type: str) -> list[bytes]:
    """The bodies of a ``multipart/related`` message (RFC 2046), in order."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/related") or match is None:
        raise ValueError(f"expected multipart/related with a boundary, found {content_type!r}")
    delimiter = b"--" + match.group(1).strip().encode()
    parts = []
    for chunk in body.split(delimiter)[1:]:  # what precedes the first delimiter is a preamble
        if chunk.startswith(b"--"):  # the close delimiter
            break
        _headers, separator, content = chunk.partition(b"\r\n\r\n")
        if not separator:
            raise ValueError("a part without the blank line that ends its headers")
        parts.append(content[:-2] if content.endswith(b"\r\n") else content)
    return parts

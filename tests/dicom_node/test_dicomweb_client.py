"""The DICOMweb client against services that answer what STOW-RS does not expect: a redirect
(a proxy sending http to https, a single sign-on gateway) and an HTML page answered 200 (a
login page). Real HTTP servers on localhost ports."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dicom_node.dicomweb import check, stow_batch
from dicom_node.outbox import Outbox, deliver_due
from dicom_node.scu import Destination
from dicom_node.settings import Destination as DestinationSettings
from dicom_node.settings import DicomWebSettings
from tests.sr_writer.synthetic_job import default_outputs


class _Server:
    """An HTTP server answering every request as ``answer`` says, keeping what it got."""

    def __init__(self, answer: tuple[int, dict[str, str], bytes]) -> None:
        self.requests: list[tuple[str, str, str]] = []  # method, path, Authorization
        status, headers, body = answer
        seen = self.requests

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                seen.append((self.command, self.path, self.headers.get("Authorization", "")))
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/dicom-web"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[list[_Server]]:
    made: list[_Server] = []
    yield made
    for server in made:
        server.stop()


def _destination(url: str, tmp_path: Path) -> Destination:
    token = tmp_path / "token"
    token.write_text("SECRET\n")
    web = DicomWebSettings(url=url, token_file=token)
    return Destination.from_settings(DestinationSettings(name="web", dicomweb=web))


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_a_redirect_is_not_followed_and_nothing_counts_as_stored(
    code: int, servers: list[_Server], tmp_path: Path
) -> None:
    """urllib followed a 302 as a GET without the objects, took that GET's 200 for the
    upload's, and sent the token to the host the Location named: every result counted as
    delivered, none stored. Now the objects fail with the redirect named, dead at once (the
    address is to be fixed), and the other host hears nothing."""
    elsewhere = _Server((200, {"Content-Type": "application/dicom+json"}, b"{}"))
    redirect = _Server((code, {"Location": elsewhere.url + "/studies"}, b""))
    servers += [elsewhere, redirect]
    dest = _destination(redirect.url, tmp_path)
    objects = default_outputs().all()[:2]
    results = stow_batch(objects, dest)
    assert [r.delivered for r in results] == [False, False]
    assert all(r.permanent for r in results)
    assert results[0].error is not None
    assert f"answered HTTP {code}" in results[0].error
    assert f"a redirect to {elsewhere.url}/studies: not followed" in results[0].error
    assert elsewhere.requests == []
    assert [(m, a) for m, _, a in redirect.requests] == [("POST", "Bearer SECRET")]
    with Outbox(tmp_path / "outbox.sqlite3") as ob:
        ob.enqueue(objects, ["web"], job="job-redirect")
        report = deliver_due(ob, [dest])
        assert (report.sent, report.dead) == (0, 2) and ob.counts() == {"web": {"dead": 2}}
    ok, said = check(dest)
    assert not ok and f"HTTP {code}" in said and "redirect" in said
    assert elsewhere.requests == []


def test_an_html_page_answered_200_is_no_stow_rs_answer(
    servers: list[_Server], tmp_path: Path
) -> None:
    login = _Server((200, {"Content-Type": "text/html; charset=utf-8"}, b"<html>Sign in</html>"))
    servers.append(login)
    results = stow_batch(default_outputs().all()[:1], _destination(login.url, tmp_path))
    assert not results[0].delivered and results[0].permanent
    assert results[0].error is not None and "an HTML page, not a STOW-RS response" in (
        results[0].error
    )

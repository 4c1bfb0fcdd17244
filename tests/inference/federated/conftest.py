"""A three-site synthetic cohort (one patient per site, 4 mm, NIfTI only) for the federated
tests; each test's site reads it through a site-name filter, like a hospital's own folder.
And a stand-in for Flower's `flwr` command that records its calls (``fake_flwr``)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="federated training needs flwr (the test extra installs it)")

FED_SEED = 5151
SITES = ("SITE-NOR", "SITE-ELO", "SITE-OST")


@pytest.fixture(scope="session")
def fed_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from inference.synthetic.cohort import generate_cohort

    out = tmp_path_factory.mktemp("fed-cohort")
    records = generate_cohort(
        out, patients=3, sites=3, seed=FED_SEED, spacing_mm=4.0, formats=("nifti",), jobs=1
    )
    assert sorted({r.values["site"] for r in records}) == sorted(SITES)
    return out


RUN_ID = "4242"

FAKE_FLWR = textwrap.dedent(
    """
    import json, os, sys, time
    from pathlib import Path

    calls = Path(os.environ["FAKE_FLWR_CALLS"])
    with calls.open("a") as fh:
        fh.write(json.dumps(sys.argv[1:]) + "\\n")
    args = sys.argv[1:]
    RUN_ID = "4242"


    def follow():
        Path(str(calls) + ".following").touch()
        rc = int(os.environ.get("FAKE_LOG_RC", "0"))
        if rc:
            print("Connection to the SuperLink is unavailable.", file=sys.stderr)
            sys.exit(rc)
        try:
            time.sleep(float(os.environ.get("FAKE_LOG_S", "120")))
        except KeyboardInterrupt:
            print("Exiting logstream")
        sys.exit(0)


    if args[0] == "run":
        assert (Path(args[1]) / "pyproject.toml").is_file()
        time.sleep(float(os.environ.get("FAKE_SUBMIT_S", "0")))
        if "--format" in args:
            print(json.dumps({"success": True, "run-id": RUN_ID}, indent=2))
        else:  # flwr run --stream
            print(f"Successfully started run {RUN_ID}", flush=True)
            follow()
    elif args[0] == "log":
        follow()
    elif args[0] == "stop":  # as Flower: with --format json, exit 0 and "success" says
        said = {"success": True, "run-id": RUN_ID}
        if os.environ.get("FAKE_STOP_FAILS"):
            said = {"success": False, "error-message": f"Run {RUN_ID} couldn't be stopped."}
        if os.environ.get("FAKE_STOP_FINISHED"):
            said = {"success": False, "error-message": "[code: 18] Run is already finished."}
        if "--format" in args:
            print(json.dumps(said, indent=2))
        elif not said["success"]:
            sys.exit(said["error-message"])
    elif args[:2] == ["supernode", "register"]:
        print(json.dumps({"success": True, "node-id": 777}, indent=2))
    else:
        sys.exit(f"unexpected flwr call {args}")
    """
)


@pytest.fixture
def fake_flwr(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The stand-in `flwr` (its calls go to ``calls.jsonl`` beside it) as this process's
    ``flower_bin("flwr")``; ``FAKE_SUBMIT_S`` (seconds a submission takes), ``FAKE_LOG_S``
    (seconds its log stream lasts), ``FAKE_LOG_RC`` (the stream's exit code),
    ``FAKE_STOP_FAILS`` and ``FAKE_STOP_FINISHED`` set its behaviour."""
    from inference.federated import deploy

    fake = tmp_path / "fake" / "flwr"
    fake.parent.mkdir()
    fake.write_text(f"#!{sys.executable}\n{FAKE_FLWR}")
    fake.chmod(0o755)
    monkeypatch.setenv("FAKE_FLWR_CALLS", str(fake.parent / "calls.jsonl"))
    monkeypatch.setattr(deploy, "flower_bin", lambda name: str(fake) if name == "flwr" else name)
    return fake


def fake_flwr_calls(fake: Path) -> list[list[str]]:
    """The stand-in's calls so far (each its arguments)."""
    path = fake.parent / "calls.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def expired_copy(cert: Path, ca_key: Path, out: Path) -> Path:
    """``cert`` re-signed by the CA key ``ca_key`` to have expired in 2020, written to ``out``
    (the CA's own certificate with its own key: an expired CA)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    key = serialization.load_pem_private_key(ca_key.read_bytes(), None)
    original = x509.load_pem_x509_certificate(cert.read_bytes())
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(original.subject)
        .issuer_name(original.issuer)
        .public_key(original.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(past)
        .not_valid_after(past + datetime.timedelta(days=30))
    )
    for ext in original.extensions:
        builder = builder.add_extension(ext.value, ext.critical)
    signed = builder.sign(key, hashes.SHA256())  # type: ignore[arg-type]
    out.write_bytes(signed.public_bytes(serialization.Encoding.PEM))
    return out

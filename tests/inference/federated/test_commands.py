"""The federate commands' checks before anything starts, and what a run records: an existing
model directory at --out, sites that drop out before a round, TLS asked for, the wrapper
processes' signals, the certificates' names and consistency, the survival classes a site's
table holds, --run-config keys."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from cryptography import x509

from dicom_node.errors import ConfigError, InferenceError
from inference.federated.certs import (
    certificate_names,
    certificate_set,
    check_certificates,
    make_certificates,
)
from inference.federated.config import RunConfig

from .conftest import SITES, expired_copy


def _main(args: list[str]) -> int:
    from dicom_node.cli import main

    return main(["federate", *args])


# ------------------------------------------------------------------------------------------
# --out


def test_an_existing_model_directory_is_refused_before_any_round_or_replaced_whole(
    fed_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`federate run|simulate` used to write over whatever --out held (save_global_model with
    overwrite=True), leaving e.g. a UNet baseline's model.yaml beside the autoencoder and
    diffusion weights of the model it replaced."""
    from inference.federated.app import check_out_dir
    from inference.federated.simulation import simulate_local
    from inference.model_predictor import ModelPredictor
    from inference.unet_baseline import baseline_preset, build_baseline_unet, save_baseline_dir

    out = tmp_path / "fed"
    save_baseline_dir(build_baseline_unet(baseline_preset("tiny")), baseline_preset("tiny"), out)
    # the weights of a latent diffusion model once saved there
    for stale in ("autoencoder.safetensors", "diffusion.safetensors", "MODEL_CARD.md"):
        (out / stale).write_bytes(b"an earlier model's")
    before = sorted(p.name for p in out.iterdir())
    run = RunConfig(out=str(out), sites=",".join(SITES[:2]), num_server_rounds=1,
                    card_metrics=False)  # fmt: skip
    expected = (
        f"{out}: expected an empty directory for the federated baseline model, found a "
        "unet-baseline model (model.yaml; train_state.json lists the stages []); the run would "
        "overwrite it: choose another --out, or pass --overwrite to replace it"
    )
    with pytest.raises(InferenceError) as err:
        check_out_dir(run)
    assert str(err.value) == expected
    # the ServerApp refuses before selecting sites (a grid that would fail if asked anything)
    with pytest.raises(InferenceError, match="expected an empty directory"):
        simulate_local(run, {}, threads=1)
    common = ["simulate", "--data", str(fed_cohort), "--out", str(out), "--rounds", "1",
              "--sites", ",".join(SITES[:2]), "--no-card-metrics", "--threads", "1"]  # fmt: skip
    assert _main(common) == 2
    assert expected in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    # --overwrite replaces the directory's model whole: no weight of the other kind is left
    assert _main([*common, "--overwrite"]) == 0
    left = sorted(p.name for p in out.iterdir())
    assert left == ["federation.json", "model.yaml", "train_state.json", "unet.safetensors"]
    assert ModelPredictor(out).kind == "unet-baseline"
    assert json.loads((out / "federation.json").read_text())["run_config"]["overwrite"] is True


# ------------------------------------------------------------------------------------------
# sites dropped


def test_a_site_gone_before_its_first_round_is_dropped_not_recorded_as_trained(
    fed_cohort: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SuperNode that stops is no longer sampled by Flower: no message is ever pending for it.
    The rounds used to log "training on" every selected site and record sites_dropped [], and
    train_state.json listed the site among those that trained the model."""
    from inference.federated.app import make_client_app, run_federation
    from inference.federated.simulation import LocalGrid

    class VanishingGrid(LocalGrid):
        """Node 3 answers the query, then its SuperNode is gone."""

        calls = 0

        def get_node_ids(self) -> Iterable[int]:
            self.calls += 1
            return [n for n in self.contexts if self.calls == 1 or n != 3]

    run = RunConfig(out=str(tmp_path / "fed"), sites=",".join(SITES), min_sites=2,
                    num_server_rounds=2, card_metrics=False)  # fmt: skip
    nodes = [{"data-path": str(fed_cohort), "site-name": s, "threads": 1} for s in SITES]
    grid = VanishingGrid(make_client_app(run), nodes, run.as_flower_config())
    with caplog.at_level(logging.INFO):
        out = run_federation(grid, run)
    gone, live = SITES[2], sorted(SITES[:2])
    assert f"site {gone} connected (node 3)" in caplog.text
    assert f"round 1/2: training on {live}" in caplog.text
    assert f"round 2 training: site {gone} was sent nothing: its node 3 is no longer connected" in (
        caplog.text
    )
    federation = json.loads((out / "federation.json").read_text())
    for rnd in federation["rounds"]:
        assert rnd["sites_trained"] == live
        assert rnd["sites_dropped"] == [gone]
    assert federation["sites"] == live
    assert federation["sites_selected"] == sorted(SITES)
    state = json.loads((out / "train_state.json").read_text())
    assert state["stages"]["baseline"]["sites"] == live


# ------------------------------------------------------------------------------------------
# federate run


def test_run_refuses_no_tls_unasked_and_unknown_run_config_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ["run", "--superlink", "fl:9092", "--out", str(tmp_path / "m"), "--print",
              "--flwr-home", str(tmp_path / "home")]  # fmt: skip
    # without --ca-cert it used to write insecure = true into config.toml and connect in clear
    assert _main(common) == 2
    assert "federate run: expected --ca-cert FILE (or --insecure), found neither" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "home" / "config.toml").exists()
    # a mistyped key used to get only the SuperLink's "[code: 15] Invalid run configuration."
    ca = make_certificates(tmp_path / "certs").ca_cert
    secure = [*common, "--ca-cert", str(ca)]
    assert _main([*secure, "--run-config", "num-server-round=2 seed=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown keys ['num-server-round']: expected among [" in err
    assert "'num-server-rounds'" in err
    assert _main([*secure, "--run-config", "num-server-rounds=0"]) == 2
    assert "num-server-rounds: expected >= 1, found 0" in capsys.readouterr().err
    assert _main([*secure, "--run-config", "num-server-rounds=2 seed=3"]) == 0
    toml = (tmp_path / "home" / "config.toml").read_text()
    assert "root-certificates" in toml and "insecure" not in toml


def test_a_run_that_wrote_no_model_points_to_the_runs_log(
    fake_flwr: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """The ServerApp's error is in the run's log stream (not the SuperLink's log); a
    federation.json left by an earlier run is no sign that this one finished."""
    import tempfile

    from inference.federated import checkpoint

    from .conftest import RUN_ID, fake_flwr_calls

    out = tmp_path / "m"
    out.mkdir()
    (out / "federation.json").write_text("{}")  # an earlier run's, with no model.yaml
    monkeypatch.setenv("FAKE_LOG_S", "0")  # the run's log ends at once
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    args = ["run", "--superlink", "fl:9092", "--insecure", "--out", str(out)]
    assert _main(args) == 2
    err = capsys.readouterr().err
    assert f"expected the global model directory {out} with a federation.json written by this " in (
        err
    )
    assert "found only an earlier run's: the run ended early (see the run's log above, or " in err
    assert f"`flwr log {RUN_ID}`)" in err and "SuperLink's log" not in err
    assert "--resume" not in err
    # the app (submitted) and connection settings written for `flwr` are removed after it
    calls = fake_flwr_calls(fake_flwr)
    assert [c[0] for c in calls] == ["run", "log"] and calls[1][1] == RUN_ID
    assert not any((tmp_path / "tmp").iterdir())
    # a run that stopped after some rounds: the message names its checkpoint and --resume
    run = RunConfig(out=str(out), num_server_rounds=5)
    checkpoint.save(run, {}, 2, {"w": torch.zeros(2)}, [], ["SITE-NOR"], 1.0, [], None)
    assert _main([*args, "--resume"]) == 2
    assert "its checkpoint (after round 2 of 5, saved at " in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# superlink / supernode wrappers


def test_stopping_the_wrapper_stops_flowers_process(tmp_path: Path) -> None:
    """SIGTERM to `glioforecast federate superlink|supernode` (a service manager stopping it)
    used to leave flower-superlink / flower-supernode running, orphaned."""
    from inference.federated.deploy import descendants

    marker = tmp_path / "started"
    child = f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(120)"
    script = textwrap.dedent(f"""
        import sys
        from inference.federated.cli import _exec
        sys.exit(_exec([sys.executable, "-c", {child!r}], False, replace=True))
    """)
    wrapper = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parents[3])
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert wrapper.poll() is None and time.monotonic() < deadline
            time.sleep(0.1)
        left = descendants(wrapper.pid)
        wrapper.send_signal(signal.SIGTERM)
        assert wrapper.wait(timeout=30) != 0
        time.sleep(0.2)
        alive = [p for p in left if Path(f"/proc/{p}").exists()]
        assert alive == [], "Flower's process outlived the wrapper"
    finally:
        for pid in descendants(wrapper.pid) + [p for p in left if Path(f"/proc/{p}").exists()]:
            os.kill(pid, signal.SIGKILL)
        if wrapper.poll() is None:
            wrapper.kill()
            wrapper.wait()


def test_supernode_refuses_survival_classes_training_would_refuse(
    fed_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The SuperNode's start checked the table without the survival classes, so a table that
    every round's training refuses (a class "Short") started a SuperNode that failed each
    round."""
    import shutil

    data = tmp_path / "site"
    shutil.copytree(fed_cohort, data)
    table = data / "cohort.csv"
    with table.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["survival_class"] = "Short"
    with table.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    site = rows[0]["site"]
    common = ["supernode", "--superlink", "fl:9092", "--insecure", "--data", str(data),
              "--site", site, "--print"]  # fmt: skip
    assert _main(common) == 2
    err = capsys.readouterr().err
    assert "'Short'" in err and "short" in err
    # a model whose classes the table holds (its model.yaml's own, given as on check-data)
    assert _main([*common, "--survival-classes", "Short,intermediate,long"]) == 0


# ------------------------------------------------------------------------------------------
# certificates


def _names(files_dir: Path) -> tuple[list[str], list[str]]:
    cert = x509.load_pem_x509_certificate(certificate_set(files_dir).server_cert.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName), [
        str(a) for a in san.get_values_for_type(x509.IPAddress)
    ]


def test_certificate_names_go_where_clients_look_and_bad_ones_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An IP given as --host used to become a DNS name (which no TLS client matches against an
    address), 127.0.0.1 was added unsaid, and a URL, a port, an empty or a long host name
    were taken or crashed (the host was the subject's CN, at most 64 characters)."""
    long_host = ".".join(["a" * 60] * 3)  # 182 characters: a valid DNS name, too long for a CN
    assert _main(["certs", "--out", str(tmp_path / "a"), "--host", "10.0.0.7", "--host",
                  long_host]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert _names(tmp_path / "a") == ([long_host], ["10.0.0.7", "127.0.0.1"])
    assert "no --ip given: the certificate names 127.0.0.1" in out
    assert f"SuperLink certificate valid for: {long_host}, 10.0.0.7, 127.0.0.1" in out
    assert _main(["certs", "--out", str(tmp_path / "b"), "--ip", "10.0.0.8"]) == 0
    assert "no --host given: the certificate names localhost" in capsys.readouterr().out
    assert _names(tmp_path / "b") == (["localhost"], ["10.0.0.8"])
    bad = {
        "https://fl.example.org": "a URL: give the host name alone",
        "fl.example.org:9092": "a port or an IPv6 address in another form",
        "": "an empty name",
        "-fl.example.org": "each label is 1 to 63 letters",
    }
    for host, why in bad.items():
        with pytest.raises(ConfigError) as err:
            make_certificates(tmp_path / "c", hosts=[host], ips=[])
        assert f"--host: expected a host name (e.g. superlink.example.org), found {host!r} " in (
            str(err.value)
        )
        assert why in str(err.value)
    assert not (tmp_path / "c").exists()


def test_superlink_refuses_certificates_it_could_not_serve(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """flower-superlink used to start with an expired certificate, a ca.crt of another CA or a
    key of another certificate, and fail at the first connection with an ssl traceback."""

    good = make_certificates(tmp_path / "good", hosts=["fl.example.org"], ips=[])
    other = make_certificates(tmp_path / "other")
    assert certificate_names(good.server_cert) == ["fl.example.org"]
    assert check_certificates(tmp_path / "good", server=True) == good

    def broken(name: str, **swap: Path) -> Path:
        d = tmp_path / name
        d.mkdir()
        for field, path in vars(good).items():
            (d / path.name).write_bytes(swap.get(field, path).read_bytes())
        return d

    cases = {
        broken("foreign-ca", ca_cert=other.ca_cert): (
            "ca.crt: expected the CA that issued superlink.crt (issuer "
        ),
        broken("foreign-key", server_key=other.server_key): (
            "superlink.key: expected the private key of superlink.crt, found another EC key"
        ),
    }
    # an expired certificate of the right CA and key
    expired = expired_copy(good.server_cert, good.ca_key, tmp_path / "expired.crt")
    cases[broken("expired", server_cert=expired)] = (
        "superlink.crt: expected a certificate valid now ("
    )
    for folder, message in cases.items():
        with pytest.raises(ConfigError) as err:
            check_certificates(folder, server=True)
        assert message in str(err.value), str(err.value)
        assert _main(["superlink", "--certs", str(folder), "--print"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ConfigError) as err:
        check_certificates(tmp_path / "expired", server=True)
    assert "found one valid from 2020-01-01 00:00 to 2020-01-31 00:00 UTC (expired;" in str(
        err.value
    )
    assert _main(["superlink", "--certs", str(tmp_path / "good"), "--print"]) == 0
    out, said = capsys.readouterr()
    assert "SuperLink certificate valid for: fl.example.org" in said
    assert out.startswith(str(Path(sys.executable).parent / "flower-superlink")) or out.startswith(
        "flower-superlink"
    )

"""Certificates, configuration errors, and whole federated runs in the in-process simulation
(the deployment's ServerApp loop and ClientApps without transport): the autoencoder stage with
its federated latent scale, and the baseline through the ``glioforecast federate simulate``
command."""

from __future__ import annotations

import dataclasses
import json
import stat
from pathlib import Path

import pytest
from cryptography import x509

from dicom_node.errors import ConfigError
from inference.federated.certs import check_certificates, make_certificates
from inference.federated.config import RunConfig, parse_node_config, parse_run_config

from .conftest import FED_SEED, SITES


def test_certificates_chain_names_and_key_modes(tmp_path: Path) -> None:
    files = make_certificates(tmp_path / "c", hosts=["fl.example.org"], ips=["10.0.0.5"])
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org"]
    assert [str(a) for a in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    for key in (files.ca_key, files.server_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    with pytest.raises(ConfigError, match="expected no certificates there"):
        make_certificates(tmp_path / "c")
    with pytest.raises(ConfigError, match="expected an IPv4 or IPv6 address, found 'nope'"):
        make_certificates(tmp_path / "d", ips=["nope"])
    (tmp_path / "e").mkdir()
    with pytest.raises(ConfigError, match=r"expected \['ca.crt'\]"):
        check_certificates(tmp_path / "e", server=False)


def test_node_keys_and_the_commands_that_use_them(
    fed_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A site's key pair is what Flower reads (EC on a NIST curve, OpenSSH format), the private
    half mode 0600; the wrappers pass it (and the SuperLink's auth switch) to Flower."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import (
        load_ssh_private_key,
        load_ssh_public_key,
    )

    from dicom_node.cli import main

    assert main(["federate", "node-key", "--out", str(tmp_path / "k"), "--name", "site-a"]) == 0
    private, public = tmp_path / "k" / "site-a.key", tmp_path / "k" / "site-a.pub"
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(public.read_bytes()) == key.public_key()
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert main(["federate", "node-key", "--out", str(tmp_path / "k"), "--name", "site-a"]) == 2
    assert "expected no key named site-a there" in capsys.readouterr().err

    ca = make_certificates(tmp_path / "certs").ca_cert
    commands = {
        "superlink": ["--certs", str(tmp_path / "certs"), "--supernode-auth"],
        "supernode": ["--superlink", "fl:9092", "--ca-cert", str(ca), "--data",
                      str(fed_cohort), "--site", SITES[0], "--auth-key", str(private)],
        "register": ["--superlink", "fl:9092", "--ca-cert", str(ca), "--public-key", str(public),
                     "--flwr-home", str(tmp_path / "home")],
    }  # fmt: skip
    expected = {
        "superlink": "--enable-supernode-auth",
        "supernode": f"--auth-supernode-private-key {private}",
        "register": f"flwr supernode register {public} glioforecast",
    }
    for command, args in commands.items():
        capsys.readouterr()
        rc = main(["federate", command, *args, "--print"])
        out, err = capsys.readouterr()
        assert rc == 0, err
        assert expected[command] in out, out
    assert 'address = "fl:9092"' in (tmp_path / "home" / "config.toml").read_text()


def test_run_config_errors_name_key_expected_and_found() -> None:
    with pytest.raises(ConfigError) as err:
        parse_run_config({"stage": "everything", "num-server-rounds": 0, "learnig-rate": 1.0})
    text = str(err.value)
    assert "unknown keys ['learnig-rate']" in text
    with pytest.raises(ConfigError) as err:
        parse_run_config({"stage": "everything", "num-server-rounds": 0})
    text = str(err.value)
    assert (
        "stage: expected one of ['baseline', 'autoencoder', 'diffusion'], found 'everything'"
        in text
    )
    assert "num-server-rounds: expected >= 1, found 0" in text
    with pytest.raises(ConfigError, match="stage1-dir"):
        RunConfig(stage="diffusion")
    run = parse_run_config(RunConfig(strategy="fedprox").as_flower_config())
    assert run.strategy == "fedprox"
    with pytest.raises(
        ConfigError, match="data-path: expected the site's cohort folder, found None"
    ):
        parse_node_config({"site-name": "A"})


def test_autoencoder_stage_federated_latent_scale(fed_cohort: Path, tmp_path: Path) -> None:
    from inference.federated.simulation import simulate_local
    from inference.model_dir import load_model_dir

    run = RunConfig(
        stage="autoencoder", preset="tiny", num_server_rounds=2, batch_size=2, learning_rate=1e-3,
        out=str(tmp_path / "ae"), sites=",".join(SITES[:2]), min_sites=2,
    )  # fmt: skip
    out = simulate_local(run, {s: [fed_cohort] for s in SITES[:2]}, threads=1)
    loaded = load_model_dir(out)
    assert loaded.config.latent_scale != 1.0 and loaded.config.latent_scale > 0
    state = json.loads((out / "train_state.json").read_text())["stages"]["autoencoder"]
    assert state["federated"] is True and state["sites"] == sorted(SITES[:2])
    assert state["latent_scale"] == pytest.approx(loaded.config.latent_scale)
    rounds = json.loads((out / "federation.json").read_text())["rounds"]
    assert set(rounds[-1]["evaluate"]) == set(SITES[:2])

    # stage 2 on the federated autoencoder; a stage-1 model.yaml asking for a weight average
    # does not make the global model claim one (the rounds keep none)
    text = (out / "model.yaml").read_text()
    (out / "model.yaml").write_text(text.replace("ema_decay: 0.0", "ema_decay: 0.9"))
    assert load_model_dir(out).config.training.ema_decay == 0.9
    run2 = dataclasses.replace(
        run, stage="diffusion", stage1_dir=str(out), out=str(tmp_path / "ldm"), num_server_rounds=1
    )
    ldm = simulate_local(run2, {s: [fed_cohort] for s in SITES[:2]}, threads=1)
    loaded2 = load_model_dir(ldm)
    assert loaded2.config.training.ema_decay == 0.0
    assert loaded2.config.latent_scale == loaded.config.latent_scale
    assert json.loads((ldm / "train_state.json").read_text())["stages"]["diffusion"]["federated"]


def test_simulate_command_writes_a_loadable_baseline(fed_cohort: Path, tmp_path: Path) -> None:
    from dicom_node.cli import main
    from inference.model_predictor import ModelPredictor

    out = tmp_path / "fed"
    rc = main([
        "federate", "simulate", "--data", str(fed_cohort), "--out", str(out), "--rounds", "1",
        "--strategy", "fedprox", "--proximal-mu", "0.1", "--min-sites", "3", "--threads", "1",
    ])  # fmt: skip
    assert rc == 0
    assert ModelPredictor(out).kind == "unet-baseline"
    rounds = json.loads((out / "federation.json").read_text())["rounds"]
    assert rounds[0]["sites_trained"] == sorted(SITES)
    assert {"dice", "psnr_global", "eval-loss"} <= set(rounds[0]["global_evaluate"])


def test_dicom_site_folders_federate_as_their_nifti_twins(fed_cohort: Path, tmp_path: Path) -> None:
    """Sites whose data are DICOM studies (MR, RTSTRUCT, RTDOSE, readers' SEGs and the outcome
    table) train and evaluate as the same patients in NIfTI do."""
    from dicom_node.cli import main
    from inference.synthetic.cohort import generate_cohort

    dicom = tmp_path / "dicom-sites"
    generate_cohort(
        dicom, patients=3, sites=3, seed=FED_SEED, spacing_mm=4.0, formats=("dicom",), jobs=1
    )
    assert not list(dicom.rglob("*.nii.gz"))
    rounds = {}
    for name, data in (("nifti", fed_cohort), ("dicom", dicom)):
        out = tmp_path / name
        rc = main([
            "federate", "simulate", "--data", str(data), "--out", str(out), "--rounds", "1",
            "--min-sites", "3", "--threads", "1",
        ])  # fmt: skip
        assert rc == 0
        rounds[name] = json.loads((out / "federation.json").read_text())["rounds"][0]
    assert rounds["dicom"]["sites_trained"] == sorted(SITES)
    nifti_metrics, dicom_metrics = (
        rounds["nifti"]["global_evaluate"],
        rounds["dicom"]["global_evaluate"],
    )
    assert set(dicom_metrics) == set(nifti_metrics)
    for key, value in nifti_metrics.items():
        # the RT Dose file stores the dose in 16-bit counts (about 1 mGy): nearly the same run
        assert dicom_metrics[key] == pytest.approx(value, rel=1e-3, abs=1e-4), key


def test_min_sites_and_unknown_sites_are_refused_before_any_wait(
    fed_cohort: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--min-sites above the sites there are, or a site with no patients, used to wait the
    whole wait-for-sites (120 s) or train a round before failing."""
    import time

    from dicom_node.cli import main

    with pytest.raises(ConfigError) as err:
        RunConfig(sites="SITE-NOR,SITE-ELO", min_sites=3)
    assert (
        "min-sites: expected at most the 2 site(s) named in sites ['SITE-NOR', 'SITE-ELO'], found 3"
    ) in str(err.value)
    common = ["federate", "simulate", "--data", str(fed_cohort), "--rounds", "1",
              "--no-card-metrics", "--threads", "1"]  # fmt: skip
    cases = {
        ("--min-sites", "4"): "min-sites: expected at most the 3 site(s) of the simulation "
        f"{sorted(SITES)}, found 4",
        ("--sites", "SITE-NOR,SITE-XYZ"): f"sites: expected sites of {fed_cohort} "
        f"({sorted(SITES)}), found ['SITE-XYZ'] with no patient there",
        ("--sites", "SITE-NOR,SITE-ELO", "--min-sites", "3"): "min-sites: expected at most "
        "the 2 site(s) named in sites",
    }
    for extra, message in cases.items():
        started = time.monotonic()
        assert main([*common, "--out", str(tmp_path / "never"), *extra]) == 2
        assert message in capsys.readouterr().err
        assert time.monotonic() - started < 20
    assert not (tmp_path / "never").exists()


def test_the_wait_for_sites_is_an_option_and_a_failing_site_says_why(
    fed_cohort: Path, tmp_path: Path
) -> None:
    """federate run and simulate take --wait-for-sites; when the sites wanted do not all
    connect in time, the error gives what each failing node sent (here a site name with no
    patients in the node's folder: the site, the step, the error's class), not only the missing
    name."""
    import argparse
    import time

    from dicom_node.errors import InferenceError
    from inference.federated.cli import _run_config, register
    from inference.federated.simulation import simulate_local

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    for command in (["simulate", "--data", str(fed_cohort)], ["run", "--superlink", "h:1"]):
        args = parser.parse_args(
            ["federate", *command, "--out", str(tmp_path / "x"), "--wait-for-sites", "7.5"]
        )
        assert _run_config(args).wait_for_sites == 7.5
    run = RunConfig(stage="baseline", out=str(tmp_path / "fed"), sites="SITE-NOR,SITE-XYZ",
                    wait_for_sites=1.0, card_metrics=False)  # fmt: skip
    started = time.monotonic()
    with pytest.raises(InferenceError) as err:
        simulate_local(run, {"SITE-NOR": [fed_cohort], "SITE-XYZ": [fed_cohort]}, threads=1)
    assert time.monotonic() - started < 30
    text = str(err.value)
    assert "to connect within 1 s, found ['SITE-NOR'] (missing ['SITE-XYZ'])" in text
    # the reason names the site, the step and the error's class; the error itself (it names the
    # node's data path) stays in the site's log
    assert (
        "; node 2 failed: SiteFailure: site SITE-XYZ: answering the query failed (ConfigError); "
        "details in the SuperNode's log" in text
    )
    assert str(fed_cohort) not in text


def test_evaluating_a_federated_model_on_its_training_sites_warns(
    fed_cohort: Path, tmp_path: Path
) -> None:
    """A federated model keeps no patient list (the patients never leave their sites) and no
    checkpoints: evaluating it on its own training patients used to give overlap None and no
    warning. Its train_state.json names its training sites, which the evaluation now counts."""
    from inference.evaluate import markdown_report, run_evaluation
    from inference.federated.simulation import simulate_local

    trained = SITES[:2]
    run = RunConfig(stage="baseline", out=str(tmp_path / "fed"), sites=",".join(trained),
                    min_sites=2, num_server_rounds=1, card_metrics=False)  # fmt: skip
    out = simulate_local(run, {s: [fed_cohort] for s in trained}, threads=1)
    assert not (out / "checkpoints").exists()
    kw = {"samples": 1, "include_no_change": False, "n_resamples": 5}
    report = run_evaluation([out], [fed_cohort], **kw)  # type: ignore[arg-type]
    (info,) = report["methods"].values()
    assert info["overlap_with_training"] == 2  # one patient per site in this cohort
    assert info["overlap_basis"] == "sites"
    assert info["training_sites"] == sorted(trained)
    text = markdown_report(report)
    assert "WARNING: 2 evaluated patient(s) are from the sites that trained the federated" in text
    assert f"({', '.join(sorted(trained))}): they may have been training patients" in text
    other = run_evaluation([out], [fed_cohort], sites=[SITES[2]], **kw)  # type: ignore[arg-type]
    (info,) = other["methods"].values()
    assert info["overlap_with_training"] == 0
    assert "WARNING" not in markdown_report(other)


def test_federated_autoencoder_training_draws_the_configured_patches(fed_cohort: Path) -> None:
    """training.autoencoder_patch (24^3 in the demo preset, 48^3 in fine) used to be ignored
    at the sites, which trained on whole crops unlike centralised training. The same start,
    seed and patients now give another step when patches are asked for."""
    import torch

    from inference.federated.config import NodeConfig
    from inference.federated.local import LocalTask, SiteWork
    from inference.model_config import tiny_config
    from inference.networks import build_model

    torch.set_num_threads(1)
    node = NodeConfig(data_path=(str(fed_cohort),), site_name=SITES[0])
    whole = tiny_config()
    patched = whole.with_training(autoencoder_patch=(8, 8, 8))
    start = build_model(whole.replace(latent_scale=1.0), seed=0).autoencoder.state_dict()
    task = LocalTask(stage="autoencoder", server_round=1, local_epochs=1, learning_rate=1e-3,
                     batch_size=2, seed=0)  # fmt: skip
    losses = {}
    for name, cfg in (("whole", whole), ("again", whole), ("patched", patched)):
        work = SiteWork(node, "latent-diffusion", cfg, "autoencoder")
        work.load(start)
        losses[name] = work.train(task)["train-loss"]
    assert losses["whole"] == losses["again"]  # the comparison is deterministic
    assert losses["patched"] != losses["whole"]

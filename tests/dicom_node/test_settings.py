"""Configuration loading and validation: every problem names the file, key, expected, found."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from dicom_node.cli import main
from dicom_node.errors import ConfigError
from dicom_node.settings import ENV_CONFIG, load_settings
from tests.conftest import REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_embedded_default_is_valid_and_safe() -> None:
    s = load_settings(None)
    assert s.source.startswith("<embedded default>")
    assert s.node.bind_address == "127.0.0.1"
    assert s.node.refuse_unknown_callers
    assert all(set(c.hosts) <= {"127.0.0.1", "::1"} for c in s.node.allowed_callers)
    assert s.assembly.quiet_period_s == 30
    assert set(s.roles.required) == {"t1c", "rtstruct"}


def test_site_example_is_valid() -> None:
    s = load_settings(REPO / "config" / "site-example.yaml")
    assert s.node.allowed_callers and s.destinations


def test_environment_variable_names_the_file(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    path = write(tmp_path, "node: {port: 4242}\n")
    monkeypatch.setenv(ENV_CONFIG, str(path))
    s = load_settings(None)
    assert s.node.port == 4242 and s.source == str(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("node: {prot: 104}", "node.prot: unknown key (expected one of: ae_title"),
        ("node: {port: 'abc'}", "node.port: expected an integer, found str 'abc'"),
        ("node: {port: 70000}", "node.port: expected an integer between 1 and 65535, found"),
        ("node: {ae_title: THIS_TITLE_IS_FAR_TOO_LONG}", "node.ae_title: expected an AE title of"),
        ("node: {refuse_unknown_callers: 'yes'}", "expected true or false, found str 'yes'"),
        ("node: {allowed_callers: [{ae_title: A, hosts: [nowhere]}]}", "hosts[0]: expected an IP"),
        ("assembly: {quiet_period_s: -1}", "assembly.quiet_period_s: expected a number >= 0.0"),
        # NaN compares false with every bound: it stopped every job (worker.job_timeout_s)
        ("worker: {job_timeout_s: .nan}", "worker.job_timeout_s: expected a finite number, found"),
        ("assembly: {poll_interval_s: .NaN}", "assembly.poll_interval_s: expected a finite number"),
        ("retention: {done_days: .inf}", "retention.done_days: expected a finite number"),
        ("roles: {rules: [{role: t1c, sop_classes: [MRImageStorage], pattern: '('}]}",
         "roles.rules[0].pattern: expected a valid regular expression"),
        ("roles: {rules: [{role: dwi, sop_classes: [MRImageStorage]}]}",
         "roles.rules[0].role: expected one of t1c"),
        ("roles: {rules: [{role: t1c}]}", "roles.rules[0].sop_classes: required key is missing"),
        ("roles: {exclude_image_types: [mip]}",
         "roles.exclude_image_types[0]: expected an ImageType value: 1 to 16 upper-case"),
        ("logging: {level: LOUD}", "logging.level: expected one of 'DEBUG'"),
        ("destinations: [{name: tps, ae_title: TPS, host: h, port: 104, objects: [sc, rtss]}]",
         "destinations[0].objects[1]: expected one of sc, uncertainty_sc, derived_mr, seg, "
         "rtstruct, rtstruct_planning, sr, found 'rtss'"),
        ("destinations: [{name: p, ae_title: P, host: h, port: 104, storage_commitment: 1}]",
         "destinations[0].storage_commitment: expected"),
        ("destinations: [{name: p, ae_title: P, host: h, port: 104, failure_notice: 'yes'}]",
         "destinations[0].failure_notice: expected"),
        ("destinations: [{name: p, ae_title: P, host: h, port: 104, reject_replaced: 'iocm'}]",
         "destinations[0].reject_replaced: expected"),
        ("node: {tls: {enabled: true}}", "node.tls.certificate: expected a file path"),
        ("node: {allowed_callers: [{ae_title: A, certificate_names: [mr1]}]}",
         "node.allowed_callers[0].certificate_names: expected node.tls enabled with "
         "ca_certificates (a client certificate is only known once verified against them), "
         "found node.tls off"),
        ("node: {tls: {enabled: true}, allowed_callers: [{ae_title: A, certificate_names: [a]}]}",
         "node.allowed_callers[0].certificate_names: expected node.tls enabled with "
         "ca_certificates (a client certificate is only known once verified against them), "
         "found no node.tls.ca_certificates"),
        ("node: {allowed_callers: [{ae_title: A, certificate_names: ['mr\t1']}]}",
         "node.allowed_callers[0].certificate_names[0]: expected a certificate name of "
         "printable ASCII"),
        ("[1, 2]", "top level: expected a mapping, found a list"),
        ("node: {port: 1\n  bad", "not valid YAML"),
    ],
)  # fmt: skip
def test_bad_values_are_refused_with_key_expected_and_found(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert str(path) in message
    assert expected in message


def test_site_file_overrides_the_embedded_default_key_by_key(tmp_path: Path) -> None:
    path = write(tmp_path, "node: {port: 4243}\nassembly: {quiet_period_s: 5}\n")
    s = load_settings(path)
    default = load_settings(None)
    assert s.node.port == 4243 and s.assembly.quiet_period_s == 5
    assert s.node.allowed_callers == default.node.allowed_callers
    assert s.roles == default.roles


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "node: {port: 0, max_associations: 0, color: red}\nstorage: 3\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert len(info.value.problems) == 4


def test_required_role_without_rule_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "roles: {required: [t1c], rules: []}\n")
    with pytest.raises(ConfigError, match="found no rule for 't1c'"):
        load_settings(path)


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path: Path) -> None:
    """YAML keeps the last of two equal keys: an edit of the first would be lost in silence."""
    text = "model:\n  directory: null\nworker:\n  job_timeout_s: 900\nmodel:\n  device: cpu\n"
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, text))
    assert "line 5, column 1: not valid YAML (duplicate key 'model' (first on line 1)" in str(
        err.value
    )
    nested = write(tmp_path, "node:\n  port: 11112\n  port: 11113\n")
    with pytest.raises(ConfigError, match=r"line 3, column 3: .*duplicate key 'port'"):
        load_settings(nested)


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_settings(tmp_path / "absent.yaml")


def test_check_config_command(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    good = REPO / "config" / "site-example.yaml"
    assert main(["check-config", str(good)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out
    assert "2 destination(s), storage commitment with pacs, failure notices to pacs\n" in out
    tls = write(
        tmp_path,
        "destinations: [{name: pacs, ae_title: P, host: h, port: 104, tls: {enabled: true}}]\n",
    )
    assert main(["check-config", str(tls)]) == 0
    assert "1 destination(s), TLS to pacs" in capsys.readouterr().out
    iocm = write(
        tmp_path,
        "destinations: [{name: pacs, ae_title: P, host: h, port: 104, reject_replaced: true}]\n",
    )
    assert main(["check-config", str(iocm)]) == 0
    assert "1 destination(s), rejection notes for replaced results to pacs\n" in (
        capsys.readouterr().out
    )
    # the PACS's storage commitment reports would be refused: said, not refused
    refused = write(
        tmp_path,
        "node: {allowed_callers: [{ae_title: MR1, hosts: [10.1.4.21]}]}\n"
        "destinations: [{name: pacs, ae_title: P, host: 10.1.8.10, port: 104,"
        " storage_commitment: true}]\n",
    )
    assert main(["check-config", str(refused)]) == 0
    out = capsys.readouterr().out
    warning = "warning: destinations[0] (pacs): storage_commitment is on, but node.allowed_callers"
    assert warning in out
    assert "lets no caller in from 10.1.8.10" in out and "hosts: [10.1.8.10]" in out
    # a failure notice to a destination that takes neither SCs nor SRs: said
    tps = write(
        tmp_path,
        "destinations: [{name: tps, ae_title: TPS, host: h, port: 104, failure_notice: true,"
        " reject_replaced: true, objects: [seg, rtstruct]}]\n",
    )
    assert main(["check-config", str(tps)]) == 0
    out = capsys.readouterr().out
    assert "warning: destinations[0] (tps): failure_notice is on, but its objects" in out
    assert "warning: destinations[0] (tps): reject_replaced is on, but its objects" in out
    bad = write(tmp_path, "node: {port: 0}\n")
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"invalid configuration in {bad}" in err and "node.port" in err


def test_check_config_loads_the_files_serve_would(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    """TLS files that are there but do not load, and a data folder that is a file, passed
    check-config (the unit's start gate), then serve exited 1 with the same file."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    afile = tmp_path / "afile"
    afile.write_text("")
    bad = write(
        tmp_path,
        f"node: {{tls: {{enabled: true, certificate: {garbage}, private_key: {garbage}}}}}\n"
        f"storage: {{data_dir: {afile}}}\n"
        "destinations: [{name: pacs, ae_title: P, host: h, port: 104,"
        f" tls: {{enabled: true, ca_certificates: {garbage}}}}}]\n",
    )
    assert main(["check-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"node.tls: cannot load its files (certificate {garbage}" in err, err
    assert "destination pacs: cannot load its TLS files" in err, err
    assert f"storage.data_dir: expected a folder, found {afile} is a file" in err, err


def test_settings_are_frozen() -> None:
    s = load_settings(None)
    with pytest.raises(AttributeError):
        s.node.port = 1  # type: ignore[misc]


def test_default_config_ships_in_the_wheel(tmp_path: Path) -> None:
    """An installed wheel finds the embedded default without the checkout."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("glioforecast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = [n for n in names if n.endswith("share/glioforecast/config/default.yaml")]
    assert shipped, names
    data = yaml.safe_load(zipfile.ZipFile(wheel).read(shipped[0]))
    assert data == yaml.safe_load((REPO / "config" / "default.yaml").read_text())
    # the documentation the systemd units name, the units and the alert rules: a site that
    # installs a wheel has no checkout to copy them from
    for shipped_file in (
        "docs/OPERATIONS.md",
        "systemd/glioforecast.service",
        "systemd/glioforecast-backup.timer",
        "prometheus/glioforecast-alerts.yml",
    ):
        assert any(n.endswith(f"share/glioforecast/{shipped_file}") for n in names), shipped_file


def test_fewer_connections_per_address_than_associations_is_a_warning(tmp_path: Path) -> None:
    from dicom_node.settings import warnings_of

    path = write(tmp_path, "node: {max_associations: 10, max_connections_per_host: 4}\n")
    said = [w for w in warnings_of(load_settings(path)) if w.startswith("node.")]
    assert said == [
        "node.max_connections_per_host (4) is below max_associations (10): a router, or "
        "senders behind one NAT address, cannot use every association the node takes"
    ]
    assert not [w for w in warnings_of(load_settings(None)) if w.startswith("node.")]


def test_fewer_connections_than_associations_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "node: {max_associations: 20, max_connections: 10}\n")
    with pytest.raises(ConfigError, match=r"node.max_connections: expected at least "
                       r"max_associations \(20\).* found 10"):  # fmt: skip
        load_settings(path)


def test_a_section_left_empty_sets_nothing(tmp_path: Path) -> None:
    """``node:`` with nothing under it (an edit half done) was read as a node section with
    every value missing, and refused with a problem about a key nobody had written."""
    settings = load_settings(write(tmp_path, "node:\nstorage:\n  min_free_mb: 700\n"))
    assert settings.node == load_settings(None).node
    assert settings.storage.min_free_mb == 700


def test_a_number_yaml_reads_as_text_says_how_to_write_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(write(tmp_path, "worker:\n  job_timeout_s: 1e9\n"))
    assert "worker.job_timeout_s: expected a number, found str '1e9' (YAML reads 1e9 as text: " \
        "write it 1.0e+9)" in str(err.value), str(err.value)  # fmt: skip
    settings = load_settings(write(tmp_path, "worker:\n  job_timeout_s: 1.0e+9\n"))
    assert settings.worker.job_timeout_s == 1e9


def test_clear_text_credentials_and_an_open_receiver_are_warnings(tmp_path: Path) -> None:
    """A DICOMweb destination on plain http with a token sends it, and the results, in clear
    text beyond this machine; a node that takes any caller on a network address takes studies
    from anyone. Neither was said."""
    from dicom_node.settings import warnings_of

    token = tmp_path / "token"
    token.write_text("secret\n")
    path = write(
        tmp_path,
        "node: {refuse_unknown_callers: false, bind_address: 0.0.0.0}\n"
        "destinations:\n"
        f"  - {{name: vna, dicomweb: {{url: 'http://vna.example.org/dicom-web', "
        f"token_file: {token}}}}}\n"
        f"  - {{name: local, dicomweb: {{url: 'http://127.0.0.1:8042/dicom-web', "
        f"token_file: {token}}}}}\n",
    )
    said = warnings_of(load_settings(path))
    assert (
        "destinations[0] (vna): http://vna.example.org/dicom-web is plain http: the results "
        "and the token or password cross the network in clear text (use https)"
    ) in said
    assert not [w for w in said if w.startswith("destinations[1]")]
    assert (
        "node.refuse_unknown_callers is false and the node listens on 0.0.0.0: any AE title "
        "from any host may send it studies"
    ) in said

"""A site proves its name with its key: the ClientApp signs the coordinator's challenge with the
private key of its node config, the coordinator verifies it with ``<site-keys>/<site>.pub`` and
leaves out a node that reports a site name it cannot prove, or one already taken."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from dicom_node.errors import ConfigError
from inference.federated.app import _refusal, client_app
from inference.federated.certs import make_node_key
from inference.federated.config import RunConfig, parse_node_config
from inference.federated.site_identity import (
    check_keys_dir,
    new_challenge,
    sign_site,
    verify_site,
)

from .conftest import SITES

NODE = 7


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The coordinator's site-keys folder: SITE-NOR.pub and SITE-ELO.pub (private keys beside
    them, as each site's node-key command leaves them)."""
    out = tmp_path_factory.mktemp("site-keys")
    for site in SITES[:2]:
        make_node_key(out, site)
    return out


def _query(cohort: Path, site: str, challenge: str, key: Path | None) -> Message:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, NODE, 1
    node: dict[str, bool | float | int | str] = {"data-path": str(cohort), "site-name": site}
    if key is not None:
        node["site-key"] = str(key)
    content = RecordDict({"config": ConfigRecord({"challenge": challenge})})
    msg = Message(content=content, dst_node_id=NODE, message_type=MessageType.QUERY)
    context = Context(run_id=1, node_id=NODE, node_config=node, state=RecordDict(), run_config={})
    reply = client_app(msg, context)
    assert not reply.has_error(), reply.error
    return reply


def test_a_site_proves_its_name_and_the_reply_leaks_no_key(fed_cohort: Path, keys: Path) -> None:
    challenge = new_challenge()
    key = keys / f"{SITES[0]}.key"
    reply = _query(fed_cohort, SITES[0], challenge, key)
    info = dict(reply.content["info"])
    assert set(info) == {"site", "proof"}
    assert info["site"] == SITES[0]
    assert verify_site(keys, SITES[0], NODE, challenge, info["proof"]) is None
    # the key's path and its contents stay at the site
    sent = repr({k: dict(v) for k, v in reply.content.items()})
    assert str(key) not in sent and str(keys) not in sent
    assert key.read_text().splitlines()[1] not in sent
    # a node without a site-key answers with its name only: the coordinator will refuse it
    bare = dict(_query(fed_cohort, SITES[0], challenge, None).content["info"])
    assert bare == {"site": SITES[0]}
    assert "found none" in str(verify_site(keys, SITES[0], NODE, challenge, bare.get("proof")))


def test_a_proof_holds_for_one_site_one_node_one_challenge(keys: Path) -> None:
    challenge = new_challenge()
    nor = sign_site(keys / f"{SITES[0]}.key", SITES[0], NODE, challenge)
    assert verify_site(keys, SITES[0], NODE, challenge, nor) is None
    another = "expected a signature made with the private key of"
    # the same signature replayed for another node or another query
    assert another in str(verify_site(keys, SITES[0], NODE + 1, challenge, nor))
    assert another in str(verify_site(keys, SITES[0], NODE, new_challenge(), nor))
    # a registered site claiming another site's name, with its own key
    elo_as_nor = sign_site(keys / f"{SITES[1]}.key", SITES[0], NODE, challenge)
    why = verify_site(keys, SITES[0], NODE, challenge, elo_as_nor)
    assert why is not None and another in why and f"{SITES[0]}.pub" in why
    # a site the coordinator has no key for
    why = verify_site(keys, SITES[2], NODE, challenge, nor)
    assert why is not None and f"{SITES[2]}.pub" in why and "found none" in why
    # malformed proofs and names
    assert "hexadecimal" in str(verify_site(keys, SITES[0], NODE, challenge, "zz" + nor[2:]))
    assert "hexadecimal" in str(verify_site(keys, SITES[0], NODE, challenge, nor[:-1]))
    assert "key file name" in str(verify_site(keys, "../etc", NODE, challenge, nor))
    flipped = nor[:-2] + ("00" if nor[-2:] != "00" else "01")
    assert another in str(verify_site(keys, SITES[0], NODE, challenge, flipped))


def test_one_node_per_site_and_only_proven_names(keys: Path) -> None:
    challenge = new_challenge()
    proof = sign_site(keys / f"{SITES[0]}.key", SITES[0], NODE, challenge)
    plain = RunConfig()
    checked = RunConfig(site_keys=str(keys))
    assert _refusal(plain, {}, NODE, SITES[0], "", None) is None
    assert _refusal(checked, {}, NODE, SITES[0], challenge, proof) is None
    # a second node reporting a site already connected is left out, with or without keys
    why = _refusal(plain, {3: SITES[0]}, NODE, SITES[0], "", None)
    assert why == f"expected one node per site, found node 3 connected as {SITES[0]} already"
    assert "found node 3" in str(_refusal(checked, {3: SITES[0]}, NODE, SITES[0], challenge, proof))
    assert "found none" in str(_refusal(checked, {}, NODE, SITES[0], challenge, None))


def test_keys_folder_and_node_key_setting_are_checked(tmp_path: Path, keys: Path) -> None:
    assert check_keys_dir(keys) == sorted(SITES[:2])
    for folder in (tmp_path / "missing", tmp_path):
        with pytest.raises(ConfigError) as err:
            check_keys_dir(folder)
        assert "<site name>.pub" in str(err.value) and str(folder) in str(err.value)
    with pytest.raises(ConfigError, match="site-key: expected a private key file path, found 3"):
        parse_node_config({"data-path": "/data", "site-key": 3})
    with pytest.raises(ConfigError, match="site-key: expected the site's private key file"):
        sign_site(tmp_path / "none.key", SITES[0], NODE, new_challenge())
    (tmp_path / "bad.key").write_text("not a key\n")
    with pytest.raises(ConfigError, match="expected an unencrypted OpenSSH or PEM private key"):
        sign_site(tmp_path / "bad.key", SITES[0], NODE, new_challenge())


def test_federate_run_refuses_a_site_keys_folder_without_keys(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "dicom_node.cli", "federate", "run", "--superlink",
           "localhost:1", "--insecure", "--out", str(tmp_path / "m"), "--site-keys",
           str(tmp_path), "--print"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "site-keys: expected a folder of <site name>.pub public keys" in done.stderr

"""Ports chosen for servers started as separate processes (Orthanc, storescp, the SuperLink)
must not be ones the kernel hands to a server bound to port 0 meanwhile."""

from __future__ import annotations

import socket

import pytest

from dicom_node import ports
from dicom_node.ports import ephemeral_range, free_port


def test_ports_chosen_are_outside_the_range_the_kernel_picks_from_and_never_repeat() -> None:
    low, high = ephemeral_range()
    chosen = [free_port() for _ in range(50)]
    assert len(set(chosen)) == len(chosen)
    assert not [p for p in chosen if low <= p <= high], (low, high, chosen)
    # what the kernel gives a server bound to port 0 (the node's SCP and STOW-RS in tests)
    servers = [socket.create_server(("127.0.0.1", 0)) for _ in range(20)]
    try:
        assert not {s.getsockname()[1] for s in servers} & set(chosen)
    finally:
        for s in servers:
            s.close()


def test_a_port_something_listens_on_is_not_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.create_server(("127.0.0.1", free_port())) as busy:
        port = busy.getsockname()[1]
        # the only candidate outside the ephemeral range is the busy port
        monkeypatch.setattr(ports, "LOWEST", port)
        monkeypatch.setattr(ports, "ephemeral_range", lambda: (port + 1, 65535))
        other = free_port()
        assert other != port
        with socket.create_server(("127.0.0.1", other)):
            pass


def test_the_range_is_read_from_the_kernel_with_linuxs_default_when_unreadable(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    (tmp_path / "range").write_text("40000\t50000\n")
    assert ephemeral_range(tmp_path / "range") == (40000, 50000)
    assert ephemeral_range(tmp_path / "absent") == (32768, 60999)

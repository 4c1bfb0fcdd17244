"""Configuration: one YAML file validated at start-up into typed, frozen settings.

The file is found in this order: the ``--config`` option, the ``GLIOFORECAST_CONFIG`` environment
variable, the embedded default (``config/default.yaml`` from a checkout, or the copy installed
with the package under ``<prefix>/share/glioforecast/config``). A site file is laid over the
embedded default key by key: mappings merge, any other value (lists included) replaces the
default, so a site writes only what it changes.

Validation is driven by the dataclasses below: every key is checked against the field's type
and constraints; unknown keys, wrong types and bad values are all reported at once, each with the
file, the dotted key, what was expected and what was found.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import sys
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dicom_node.errors import ConfigError
from dicom_node.types import OUTPUT_KINDS
from dicom_node.yamlload import load_yaml

ENV_CONFIG = "GLIOFORECAST_CONFIG"
EMBEDDED = "<embedded default>"

ROLE_NAMES = ("t1c", "flair", "t2", "t1", "rtstruct", "rtdose", "rtplan")
ROLE_NAME_HELP = ", ".join(ROLE_NAMES)


def _spec(
    doc: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    check: typing.Callable[[Any], str | None] | None = None,
) -> dict[str, Any]:
    return {"doc": doc, "min": minimum, "max": maximum, "check": check}


def _check_ae_title(value: str) -> str | None:
    if not 1 <= len(value.strip()) <= 16:
        return f"an AE title of 1 to 16 characters, found {value!r} ({len(value.strip())})"
    if "\\" in value or any(ord(c) < 32 or ord(c) > 126 for c in value):
        return f"an AE title of printable ASCII without backslash, found {value!r}"
    return None


def _check_lo(value: str) -> str | None:
    if len(value) > 64 or "\\" in value or any(ord(c) < 32 for c in value):
        return f"at most 64 characters, no backslash or control character, found {value!r}"
    return None


def _check_ae_pattern(value: str) -> str | None:
    return None if value == "*" else _check_ae_title(value)


def _check_output_kind(value: str) -> str | None:
    if value not in OUTPUT_KINDS:
        return f"one of {', '.join(OUTPUT_KINDS)}, found {value!r}"
    return None


def _check_regex(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"a valid regular expression, found {value!r} ({exc})"
    return None


def _check_host(value: str) -> str | None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return f"an IP address or network (e.g. 10.1.2.3 or 10.1.0.0/16), found {value!r}"
    return None


def _check_certificate_name(value: str) -> str | None:
    if not 1 <= len(value) <= 255 or value != value.strip():
        return f"a certificate name of 1 to 255 characters, found {value!r}"
    if any(ord(c) < 32 or ord(c) > 126 for c in value):
        return f"a certificate name of printable ASCII, found {value!r}"
    return None


#: what ``certificate_names`` means, wherever a sender may be bound to its TLS certificate
_CERTIFICATE_NAMES = _spec(
    "names of which its TLS client certificate must carry one: a DNS or IP subject alternative "
    "name, or the subject's common name when the certificate has no such alternative names "
    "(empty: no certificate is asked of it)",
    check=_check_certificate_name,
)


def _check_bind(value: str) -> str | None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return f"an IP address to listen on (e.g. 0.0.0.0, ::, 127.0.0.1), found {value!r}"
    return None


def _check_role(value: str) -> str | None:
    return None if value in ROLE_NAMES else f"one of {ROLE_NAME_HELP}, found {value!r}"


def _check_sop_class(value: str) -> str | None:
    from pydicom.uid import UID

    if re.fullmatch(r"[0-9]+(\.[0-9]+)+", value):
        return None
    from pynetdicom import sop_class

    if isinstance(getattr(sop_class, value, None), UID):
        return None
    return f"a SOP class UID or keyword such as MRImageStorage, found {value!r}"


def _fullmatch(pattern: str, expected: str) -> typing.Callable[[str], str | None]:
    """A check that a value matches ``pattern`` whole, saying ``expected`` when it does not."""

    def check(value: str) -> str | None:
        return None if re.fullmatch(pattern, value) else f"{expected}, found {value!r}"

    return check


_check_image_type_value = _fullmatch(
    r"[A-Z0-9_ ]{1,16}",
    "an ImageType value: 1 to 16 upper-case letters, digits, spaces or underscores (e.g. MIP "
    "or PROJECTION IMAGE)",
)


@dataclass(frozen=True)
class AllowedCaller:
    """A sender that may associate: an AE title (or ``*``), optionally bound to hosts and to
    the names of its TLS client certificate (``node.tls`` on, with ``ca_certificates``)."""

    ae_title: str = field(metadata=_spec("calling AE title or *", check=_check_ae_pattern))
    hosts: tuple[str, ...] = field(
        default=(),
        metadata=_spec("addresses or networks it may call from (empty: any)", check=_check_host),
    )
    certificate_names: tuple[str, ...] = field(default=(), metadata=_CERTIFICATE_NAMES)


@dataclass(frozen=True)
class TLSSettings:
    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = field(default="GLIOFORECAST", metadata=_spec("", check=_check_ae_title))
    bind_address: str = field(default="127.0.0.1", metadata=_spec("", check=_check_bind))
    port: int = field(default=11112, metadata=_spec("", minimum=1, maximum=65535))
    max_associations: int = field(default=10, metadata=_spec("", minimum=1, maximum=1000))
    # connections held open at once by each listener (DICOM, STOW-RS, health), in all and from
    # one address, associations or not (dicom_node.listener.ConnectionLimit)
    max_connections: int = field(default=100, metadata=_spec("", minimum=1, maximum=10000))
    max_connections_per_host: int = field(default=20, metadata=_spec("", minimum=1, maximum=10000))
    max_pdu_bytes: int = field(
        default=262144, metadata=_spec("0 = unlimited", minimum=0, maximum=2**32 - 1)
    )
    acse_timeout_s: float = field(default=30.0, metadata=_spec("", minimum=0.1))
    dimse_timeout_s: float = field(default=60.0, metadata=_spec("", minimum=0.1))
    network_timeout_s: float = field(default=60.0, metadata=_spec("", minimum=0.1))
    refuse_unknown_callers: bool = True
    allowed_callers: tuple[AllowedCaller, ...] = ()
    tls: TLSSettings = TLSSettings()


@dataclass(frozen=True)
class StorageSettings:
    data_dir: Path = Path("glioforecast-data")
    min_free_mb: int = field(default=512, metadata=_spec("", minimum=0))

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def database(self) -> Path:
        return self.data_dir / "jobs.sqlite3"


@dataclass(frozen=True)
class RetentionSettings:
    """How long the spool keeps a study's instances once nothing more is to be done with them,
    in days (0: for ever). ``done_days`` counts from the study's last instance, once its latest
    job is done and every result it queued has been delivered; ``failed_days`` once its latest
    job failed (missing series, unreadable input): long enough for a structure set made later
    to arrive and reopen the study. ``forget_days`` after the files went, the study's records
    go too (its instance list, jobs, their series and events, and its delivered results' outbox
    rows), so that the databases stop growing (:mod:`dicom_node.retention`). The running node
    checks every ``check_interval_s``; ``glioforecast spool prune`` does the same on demand."""

    done_days: float = field(default=7.0, metadata=_spec("", minimum=0.0))
    failed_days: float = field(default=30.0, metadata=_spec("", minimum=0.0))
    forget_days: float = field(default=90.0, metadata=_spec("", minimum=0.0))
    check_interval_s: float = field(default=3600.0, metadata=_spec("", minimum=1.0))


@dataclass(frozen=True)
class AssemblySettings:
    quiet_period_s: float = field(default=30.0, metadata=_spec("", minimum=0.0))
    poll_interval_s: float = field(default=1.0, metadata=_spec("", minimum=0.01, maximum=60))
    # RT objects from another study of the same patient (dicom_node.linking); 0 = never
    link_rt_days: float = field(default=30.0, metadata=_spec("", minimum=0.0))


@dataclass(frozen=True)
class RoleRule:
    """One rule: a series whose SOP class is listed and whose text matches gets ``role``.

    The text is SeriesDescription, ProtocolName and SequenceName joined by `` | ``;
    ``contrast`` tests the ContrastBolusAgent attribute (present / absent / any).
    """

    role: str = field(metadata=_spec("", check=_check_role))
    sop_classes: tuple[str, ...] = field(metadata=_spec("", check=_check_sop_class))
    pattern: str | None = field(default=None, metadata=_spec("", check=_check_regex))
    exclude: str | None = field(default=None, metadata=_spec("", check=_check_regex))
    contrast: Literal["present", "absent", "any"] = "any"


@dataclass(frozen=True)
class RoleSettings:
    required: tuple[str, ...] = field(
        default=("t1c", "rtstruct"), metadata=_spec("", check=_check_role)
    )
    on_ambiguous: Literal["latest", "fail"] = "latest"
    roi_pattern: str = field(
        default=r"(?i)^\s*(gtv|gross|tumou?r)", metadata=_spec("", check=_check_regex)
    )
    # several ROIs matching roi_pattern (a multifocal tumour's GTV_1, GTV_2): their union is the
    # tumour (of those typed GTV when some are), instead of an error
    roi_union: bool = False
    rules: tuple[RoleRule, ...] = ()
    # a series whose ImageType has one of these values (or one of them followed by "_", as in
    # MIP_TRA) gets no role: a projection, a subtraction or a map is not the acquired volume
    exclude_image_types: tuple[str, ...] = field(
        default=(), metadata=_spec("", check=_check_image_type_value)
    )


@dataclass(frozen=True)
class DestinationTLS:
    """DICOM over TLS (1.2 or later) to a destination: its certificate is checked against
    ``ca_certificates`` (the system's CAs when left out) and its name against ``server_name``
    (the destination's host when left out); ``certificate`` and ``private_key`` are the node's
    own, for a PACS that asks for a client certificate."""

    enabled: bool = False
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    server_name: str | None = None


def _check_url(value: str) -> str | None:
    parsed = urllib.parse.urlsplit(value)
    if parsed.scheme in ("http", "https") and parsed.hostname and not parsed.query:
        return None
    return f"an http:// or https:// URL of a DICOMweb service without a query, found {value!r}"


@dataclass(frozen=True)
class DicomWebSettings:
    """A DICOMweb service the results go to by STOW-RS (``url``: its base, the one under which
    ``/studies`` is), instead of DICOM: a cloud PACS or a VNA that speaks only HTTP. Over
    https the destination's ``tls`` says which CAs to trust and which client certificate to
    present. Authentication: a bearer token read from ``token_file``, or HTTP Basic with
    ``username`` and the password read from ``password_file`` (files, so that the secrets
    are not in the configuration)."""

    url: str = field(default="", metadata=_spec("", check=_check_url))
    token_file: Path | None = None
    username: str = ""
    password_file: Path | None = None
    timeout_s: float = field(default=120.0, metadata=_spec("", minimum=1.0))


@dataclass(frozen=True)
class Destination:
    """A PACS (or any C-STORE SCP) that receives the results: by DICOM (``ae_title``, ``host``,
    ``port``), or by DICOMweb (``dicomweb.url``)."""

    name: str
    ae_title: str = field(default="", metadata=_spec("", check=_check_ae_title))
    host: str = ""
    port: int = field(default=0, metadata=_spec("", minimum=1, maximum=65535))
    # ask the PACS to commit to keeping what it received (Storage Commitment Push Model); a
    # delivery counts only once it did. The PACS must know this node's AE title, address and
    # port to send its report, and node.allowed_callers must let it in.
    storage_commitment: bool = False
    # which of a job's objects go there (OUTPUT_KINDS); empty: all of them. A planning system
    # typically takes the RTSTRUCTs and the SEG, not the Secondary Captures or the SR
    objects: tuple[str, ...] = field(default=(), metadata=_spec("", check=_check_output_kind))
    # when no prediction can be made for a study (a required series missing, unusable input,
    # a model error), send the study a notice saying so and why (an SC page and an SR)
    failure_notice: bool = False
    # when newer results of a study replace earlier ones (a late series or structure set
    # reopened it), send the earlier ones it holds an IHE IOCM rejection note ("Rejected for
    # Quality Reasons") so that a PACS implementing IOCM hides them; earlier results not yet
    # delivered are withdrawn at every destination, whatever this says
    reject_replaced: bool = False
    tls: DestinationTLS = DestinationTLS()
    dicomweb: DicomWebSettings = DicomWebSettings()


@dataclass(frozen=True)
class SendingSettings:
    calling_ae_title: str = field(default="GLIOFORECAST", metadata=_spec("", check=_check_ae_title))
    retry_initial_s: float = field(default=10.0, metadata=_spec("", minimum=0.0))
    retry_max_s: float = field(default=600.0, metadata=_spec("", minimum=0.0))
    dead_after_attempts: int = field(default=50, metadata=_spec("", minimum=1))
    # storage commitment: how long to wait for the PACS's report before asking again, and how
    # many unanswered requests make the delivery dead
    commitment_timeout_s: float = field(default=3600.0, metadata=_spec("", minimum=1.0))
    commitment_max_requests: int = field(default=3, metadata=_spec("", minimum=1))
    # how long to wait for a DICOM destination's answer to each C-STORE (or storage
    # commitment request) before counting the attempt failed: a PACS that takes longer (one
    # that compresses or forwards before answering) needs more
    response_timeout_s: float = field(default=60.0, metadata=_spec("", minimum=1.0))


@dataclass(frozen=True)
class OutputSettings:
    """Which optional objects a job makes (``docs/OUTPUTS.md``): the uncertainty Secondary
    Capture series, the derived MR series (the prediction as MR images, for linked scrolling
    and MPR in viewers that need an MR), and the Institution Name the SR carries."""

    uncertainty_sc: bool = True
    derived_mr: bool = False
    institution_name: str = field(default="", metadata=_spec("", check=_check_lo))


@dataclass(frozen=True)
class RetrieveSettings:
    """Ask a PACS for the RT objects a study lacks (:mod:`dicom_node.retrieve`): when a study
    has its T1-Gd but no structure set (of its own or of another study of the patient), the
    node queries ``source`` (the name of a destination) for the patient's RT structure sets,
    doses and registrations (C-FIND) and has it send them (C-MOVE to ``node.ae_title``; the
    PACS must know the node's AE title, address and port as a move destination, and
    ``node.allowed_callers`` must let the PACS in), or send them back (C-GET, ``method:
    get``). ``attempts`` tries when the PACS cannot be
    reached, ``retry_interval_s`` apart; ``window_days`` around the study's date bounds the
    studies asked about; one C-MOVE may take ``move_timeout_s``. A study whose failed job the
    PACS had nothing for is asked about again every ``ask_again_h`` hours for
    ``ask_again_days`` days after the first time (a plan drawn after the MR; 0: never)."""

    source: str = ""
    # move: the PACS sends to the node's receiver (it must know the node's address); get: it
    # sends back on the node's own association (for a PACS that cannot reach the node)
    method: Literal["move", "get"] = "move"
    attempts: int = field(default=3, metadata=_spec("", minimum=1, maximum=100))
    retry_interval_s: float = field(default=60.0, metadata=_spec("", minimum=0.0))
    window_days: float = field(default=30.0, metadata=_spec("", minimum=0.0))
    max_studies: int = field(default=20, metadata=_spec("", minimum=1, maximum=1000))
    move_timeout_s: float = field(default=600.0, metadata=_spec("", minimum=1.0))
    ask_again_h: float = field(default=6.0, metadata=_spec("", minimum=0.0))
    ask_again_days: float = field(default=14.0, metadata=_spec("", minimum=0.0))


@dataclass(frozen=True)
class ModelSettings:
    """The predictor: a model directory, or none for the "no change" baseline.

    ``samples`` and ``guidance_scale`` left out take the model's own defaults (model.yaml);
    ``device: auto`` uses a CUDA GPU when there is one, the CPU otherwise.
    """

    directory: Path | None = None
    samples: int | None = field(default=None, metadata=_spec("", minimum=1, maximum=64))
    guidance_scale: float | None = field(default=None, metadata=_spec("", minimum=0.0))
    device: Literal["auto", "cpu", "cuda"] = "auto"


@dataclass(frozen=True)
class WorkerSettings:
    """How jobs run: each in its own process, killed after ``job_timeout_s``. When
    ``max_queued_jobs`` studies wait for the worker, the receiver answers new instances 0xA700
    (out of resources) so that senders keep them and retry later."""

    job_timeout_s: float = field(default=900.0, metadata=_spec("", minimum=1.0))
    max_attempts: int = field(default=2, metadata=_spec("", minimum=1, maximum=10))
    max_queued_jobs: int = field(default=50, metadata=_spec("", minimum=1))
    # after a job could not store its results (disk full...): it waits, and no job starts for
    # this long, doubled for each such job in a row up to an hour (dicom_node.worker)
    storage_retry_s: float = field(default=60.0, metadata=_spec("", minimum=0.1))


@dataclass(frozen=True)
class HealthSettings:
    """The HTTP health and metrics endpoint (``/health``, ``/metrics``)."""

    enabled: bool = True
    bind_address: str = field(default="127.0.0.1", metadata=_spec("", check=_check_bind))
    port: int = field(default=11113, metadata=_spec("", minimum=0, maximum=65535))


_check_base_path = _fullmatch(
    r"(/[A-Za-z0-9._~-]+)*",
    "a URL path such as /dicom-web (empty for the root; letters, digits, . _ ~ - between "
    "slashes, no trailing slash)",
)


@dataclass(frozen=True)
class WebClient:
    """A sender that may store by STOW-RS: identified by a bearer token read from
    ``token_file``, or by HTTP Basic (``username``, the password read from ``password_file``),
    or by its address alone (``hosts`` and no credentials), or by its TLS client certificate
    alone (``certificate_names`` and no credentials); ``hosts`` and ``certificate_names``, when
    given, also bound a client with credentials. ``name`` stands for the calling AE title
    wherever the node records who sent a study."""

    name: str = field(metadata=_spec("", check=_check_ae_title))
    hosts: tuple[str, ...] = field(
        default=(),
        metadata=_spec("addresses or networks it may call from (empty: any)", check=_check_host),
    )
    token_file: Path | None = None
    username: str = ""
    password_file: Path | None = None
    certificate_names: tuple[str, ...] = field(default=(), metadata=_CERTIFICATE_NAMES)


@dataclass(frozen=True)
class StowSettings:
    """The DICOMweb receiver: STOW-RS (PS3.18 10.5) at ``POST {path}/studies`` and
    ``POST {path}/studies/{StudyInstanceUID}``, on its own port; https with the receiver's
    certificate when ``node.tls`` is enabled. Instances are stored as a C-STORE would store
    them."""

    enabled: bool = False
    bind_address: str = field(default="127.0.0.1", metadata=_spec("", check=_check_bind))
    port: int = field(default=11114, metadata=_spec("", minimum=0, maximum=65535))
    path: str = field(default="/dicom-web", metadata=_spec("", check=_check_base_path))
    # a request's body is at most this large (413 beyond), and at most this many requests
    # are stored at once (503 with Retry-After beyond)
    max_request_mb: int = field(default=4096, metadata=_spec("", minimum=1))
    max_requests: int = field(default=4, metadata=_spec("", minimum=1, maximum=100))
    clients: tuple[WebClient, ...] = ()


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail (IHE ATNA, :mod:`dicom_node.audit`): DICOM audit messages to an audit
    record repository (syslog at ``host``:``port`` over ``tls`` or ``udp``) and/or appended to
    ``file``. They name patients, unlike the logs."""

    enabled: bool = False
    host: str = ""
    port: int = field(default=6514, metadata=_spec("", minimum=1, maximum=65535))
    transport: Literal["tls", "udp"] = "tls"
    # TLS: the repository's certificate is checked against ca_certificates (the system's CAs
    # when left out) and server_name (host when left out); certificate and private_key are
    # the node's, for a repository that asks for one
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    server_name: str = ""
    file: Path | None = None
    # AuditSourceID (default: node.ae_title) and AuditEnterpriseSiteID of every message
    source_id: str = ""
    enterprise_site_id: str = ""


@dataclass(frozen=True)
class LoggingSettings:
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["text", "json"] = "text"


@dataclass(frozen=True)
class Settings:
    node: NodeSettings = NodeSettings()
    storage: StorageSettings = StorageSettings()
    retention: RetentionSettings = RetentionSettings()
    assembly: AssemblySettings = AssemblySettings()
    roles: RoleSettings = RoleSettings()
    destinations: tuple[Destination, ...] = ()
    sending: SendingSettings = SendingSettings()
    outputs: OutputSettings = OutputSettings()
    retrieve: RetrieveSettings = RetrieveSettings()
    model: ModelSettings = ModelSettings()
    worker: WorkerSettings = WorkerSettings()
    health: HealthSettings = HealthSettings()
    stow: StowSettings = StowSettings()
    audit: AuditSettings = AuditSettings()
    logging: LoggingSettings = LoggingSettings()
    source: str = field(default=EMBEDDED, metadata={"internal": True})


# --------------------------------------------------------------------------------------------
# validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if tp is Path:
        return "a path"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({getattr(tp, '__name__', tp)})"
    return str(tp)


def _found(value: Any) -> str:
    kind = {dict: "a mapping", list: "a list", bool: "a boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    number = value.strip() if isinstance(value, str) else ""
    if re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", number):
        # YAML 1.1 (PyYAML) reads exponent form as a number only with a point and a sign
        text += f" (YAML reads {number} as text: write it {_yaml_float(number)})"
    return f"{kind} {text}" if kind not in ("nothing",) else "nothing (null)"


def _yaml_float(number: str) -> str:
    """``number`` (exponent form) as YAML 1.1 reads it as a number: ``1e9`` -> ``1.0e+9``."""
    mantissa, exponent = re.split("[eE]", number, maxsplit=1)
    if "." not in mantissa:
        mantissa += ".0"
    return f"{mantissa}e{exponent if exponent[0] in '+-' else '+' + exponent}"


class _Validator:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def fail(self, key: str, expected: str, found: str) -> None:
        self.problems.append(f"{key}: expected {expected}, found {found}")

    def convert(self, tp: Any, value: Any, key: str, meta: dict[str, Any]) -> Any:
        origin = typing.get_origin(tp)
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if value is None and type(None) in typing.get_args(tp):
                return None
            return self.convert(args[0], value, key, meta)
        if dataclasses.is_dataclass(tp):
            return self.dataclass(typing.cast(type, tp), value, key)
        if origin is tuple:
            (item_tp, *_rest) = typing.get_args(tp)
            if isinstance(value, str | int | float) and not isinstance(value, bool):
                value = [value]  # a single item where a list is expected
            if not isinstance(value, list):
                self.fail(key, _type_name(tp), _found(value))
                return ()
            return tuple(self.convert(item_tp, v, f"{key}[{i}]", meta) for i, v in enumerate(value))
        if origin is Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                self.fail(key, _type_name(tp), _found(value))
                return choices[0]
            return value
        return self.scalar(tp, value, key, meta)

    def scalar(self, tp: Any, value: Any, key: str, meta: dict[str, Any]) -> Any:
        ok = (
            (tp is bool and isinstance(value, bool))
            or (tp is int and isinstance(value, int) and not isinstance(value, bool))
            or (tp is float and isinstance(value, int | float) and not isinstance(value, bool))
            or (tp in (str, Path) and isinstance(value, str))
        )
        if not ok:
            self.fail(key, _type_name(tp), _found(value))
            return None
        if tp is float:
            value = float(value)
            if not math.isfinite(value):  # NaN passes every bound: it compares false
                self.fail(key, "a finite number", _found(value))
                return None
        if tp is Path:
            if not value.strip():
                self.fail(key, "a non-empty path", _found(value))
                return None
            value = Path(value).expanduser()
        lo, hi = meta.get("min"), meta.get("max")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
            self.fail(key, f"{_type_name(tp)} {bounds}", _found(value))
        check = meta.get("check")
        if check is not None:
            message = check(value)
            if message:
                self.problems.append(f"{key}: expected {message}")
        return value

    def dataclass(self, cls: type, value: Any, key: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(key or "top level", _type_name(cls), _found(value))
            return None
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
        for name in value:
            if name not in fields:
                where = f"{key}.{name}" if key else str(name)
                self.problems.append(f"{where}: unknown key (expected one of: {', '.join(fields)})")
        kwargs: dict[str, Any] = {}
        for name, f in fields.items():
            where = f"{key}.{name}" if key else name
            if name in value:
                kwargs[name] = self.convert(hints[name], value[name], where, dict(f.metadata))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                self.problems.append(f"{where}: required key is missing")
        if self.problems:
            # keep going to collect problems, but a partially invalid object cannot be built
            try:
                return cls(**{k: v for k, v in kwargs.items() if v is not None})
            except TypeError:
                return None
        return cls(**kwargs)


def _audit_checks(a: AuditSettings) -> list[str]:
    if not a.enabled:
        return []
    problems = []
    if not a.host and a.file is None:
        problems.append(
            "audit: expected a repository (audit.host) or a file (audit.file) when the audit "
            "trail is enabled, found neither"
        )
    if a.file is not None and not a.file.parent.is_dir():
        problems.append(f"audit.file: expected a file in an existing folder, found {a.file}")
    if a.host and a.transport == "tls":
        problems += _client_tls_checks("audit", a.ca_certificates, a.certificate, a.private_key)
    return problems


def _client_tls_checks(
    where: str, ca_certificates: Path | None, certificate: Path | None, private_key: Path | None
) -> list[str]:
    """The files of a TLS client (the node towards a destination or the audit repository)."""
    problems = []
    files = {"ca_certificates": ca_certificates, "certificate": certificate,
             "private_key": private_key}  # fmt: skip
    for name, path in files.items():
        if path is not None and not path.is_file():
            problems.append(f"{where}.{name}: expected an existing file, found {path}")
    if (certificate is None) != (private_key is None):
        problems.append(
            f"{where}: expected both certificate and private_key (a client certificate), or "
            "neither, found only " + ("certificate" if certificate is not None else "private_key")
        )
    return problems


def _destination_checks(where: str, d: Destination) -> list[str]:
    """A destination is reached by DICOM or by DICOMweb, with what that needs."""
    web = d.dicomweb
    dimse = [k for k in ("ae_title", "host", "port") if getattr(d, k)]
    if not web.url:
        missing = [k for k in ("ae_title", "host", "port") if k not in dimse]
        if missing:
            return [
                f"{where}: expected ae_title, host and port (DICOM) or dicomweb.url "
                f"(DICOMweb), found no {', '.join(missing)}"
            ]
        if web.token_file or web.username or web.password_file:
            return [f"{where}.dicomweb: expected a url with its authentication, found none"]
        return []
    problems = []
    if dimse:
        problems.append(
            f"{where}: expected either ae_title, host and port (DICOM) or dicomweb.url "
            f"(DICOMweb), found both ({', '.join(dimse)} and dicomweb.url)"
        )
    if d.storage_commitment:
        problems.append(
            f"{where}.storage_commitment: expected false for a DICOMweb destination (storage "
            "commitment is a DICOM service), found true"
        )
    return problems + _secret_checks(
        f"{where}.dicomweb", web.token_file, web.username, web.password_file
    )


def _secret_checks(
    where: str, token_file: Path | None, username: str, password_file: Path | None
) -> list[str]:
    """HTTP credentials: a bearer token file, or a username with a password file, or none."""
    problems = []
    if token_file is not None and (username or password_file is not None):
        problems.append(
            f"{where}: expected a token_file or a username and password_file, found both"
        )
    if bool(username) != (password_file is not None):
        problems.append(
            f"{where}: expected username and password_file together, found only "
            + ("username" if username else "password_file")
        )
    for key, path in (("token_file", token_file), ("password_file", password_file)):
        if path is not None and not path.is_file():
            problems.append(f"{where}.{key}: expected an existing file, found {path}")
    return problems


def _stow_checks(s: StowSettings, ports: dict[int, str]) -> list[str]:
    """A receiver that is on has a port of its own (``ports``: the others, by key), lets
    someone in, and each of its clients is identifiable."""
    if not s.enabled:
        return []
    problems = []
    if s.port and s.port in ports:
        problems.append(
            f"stow.port: expected a port of its own, found {s.port}, which {ports[s.port]} uses too"
        )
    if not s.clients:
        problems.append(
            "stow.clients: expected at least one client when stow.enabled is true (otherwise "
            "every request is refused), found none"
        )
    for n, c in enumerate(s.clients):
        where = f"stow.clients[{n}]"
        problems += _secret_checks(where, c.token_file, c.username, c.password_file)
        basic = bool(c.username) or c.password_file is not None
        if c.token_file is None and not basic and not c.hosts and not c.certificate_names:
            problems.append(
                f"{where}: expected a token_file, a username and password_file, hosts (a client "
                "identified by its address) or certificate_names (by its TLS client "
                "certificate), found none of them"
            )
    names = [c.name for c in s.clients]
    for name in sorted({n for n in names if names.count(n) > 1}):
        problems.append(f"stow.clients: expected unique names, found {name!r} twice")
    return problems


def _cross_checks(s: Settings) -> list[str]:
    problems = []
    tls = s.node.tls
    if tls.enabled:
        for name in ("certificate", "private_key"):
            path = getattr(tls, name)
            if path is None:
                problems.append(f"node.tls.{name}: expected a file path when TLS is enabled")
            elif not path.is_file():
                problems.append(f"node.tls.{name}: expected an existing file, found {path}")
        if tls.require_client_certificate and tls.ca_certificates is None:
            problems.append(
                "node.tls.ca_certificates: expected a CA file when "
                "require_client_certificate is true"
            )
        elif tls.ca_certificates is not None and not tls.ca_certificates.is_file():
            problems.append(
                f"node.tls.ca_certificates: expected an existing file, found {tls.ca_certificates}"
            )
    for n, d in enumerate(s.destinations):
        problems += _destination_checks(f"destinations[{n}]", d)
        if d.tls.enabled:
            problems += _client_tls_checks(
                f"destinations[{n}].tls", d.tls.ca_certificates, d.tls.certificate,
                d.tls.private_key,
            )  # fmt: skip
    problems += _audit_checks(s.audit)
    ports = {s.node.port: "node.port"}
    if s.health.enabled and s.health.port:
        if s.health.port in ports:
            problems.append(f"health.port: expected a port of its own, found {s.health.port}, "
                            "which node.port uses too")  # fmt: skip
        ports.setdefault(s.health.port, "health.port")
    problems += _stow_checks(s.stow, ports)
    bound = [(f"node.allowed_callers[{n}]", c.certificate_names)
             for n, c in enumerate(s.node.allowed_callers)]  # fmt: skip
    if s.stow.enabled:
        bound += [(f"stow.clients[{n}]", c.certificate_names) for n, c in enumerate(s.stow.clients)]
    for where, required in bound:
        if required and not (tls.enabled and tls.ca_certificates is not None):
            problems.append(
                f"{where}.certificate_names: expected node.tls enabled with ca_certificates (a "
                "client certificate is only known once verified against them), found "
                + ("no node.tls.ca_certificates" if tls.enabled else "node.tls off")
            )
    if s.node.max_connections < s.node.max_associations:
        problems.append(
            f"node.max_connections: expected at least max_associations "
            f"({s.node.max_associations}): every association is a connection; found "
            f"{s.node.max_connections}"
        )
    if s.node.refuse_unknown_callers and not s.node.allowed_callers:
        problems.append(
            "node.allowed_callers: expected at least one caller when refuse_unknown_callers "
            "is true (otherwise every association is refused)"
        )
    model_dir = s.model.directory
    if model_dir is not None and not (model_dir / "model.yaml").is_file():
        problems.append(
            f"model.directory: expected a model directory with a model.yaml, found {model_dir}"
        )
    names = [d.name for d in s.destinations]
    for name in {n for n in names if names.count(n) > 1}:
        problems.append(f"destinations: expected unique names, found {name!r} twice")
    if s.sending.retry_max_s < s.sending.retry_initial_s:
        problems.append(
            f"sending.retry_max_s: expected >= retry_initial_s ({s.sending.retry_initial_s}), "
            f"found {s.sending.retry_max_s}"
        )
    if s.retrieve.source and s.retrieve.source not in names:
        known = ", ".join(names) or "none configured"
        problems.append(
            f"retrieve.source: expected the name of a destination ({known}), "
            f"found {s.retrieve.source!r}"
        )
    roles_with_rules = {r.role for r in s.roles.rules}
    for role in s.roles.required:
        if role not in roles_with_rules:
            problems.append(
                f"roles.required: expected every required role to have a rule, "
                f"found no rule for {role!r}"
            )
    return problems


def parse_settings(data: Any, source: str) -> Settings:
    """Validate a decoded YAML document into :class:`Settings` or raise :class:`ConfigError`."""
    validator = _Validator()
    settings = validator.dataclass(Settings, data, "")
    if validator.problems or settings is None:
        raise ConfigError(source, validator.problems or ["the document is empty"])
    problems = _cross_checks(settings)
    if problems:
        raise ConfigError(source, problems)
    return dataclasses.replace(settings, source=source)


def default_config_path() -> Path:
    """The embedded default: the checkout's config/ or the copy installed with the package."""
    candidates = [
        Path(__file__).resolve().parents[1] / "config" / "default.yaml",
        Path(sys.prefix) / "share" / "glioforecast" / "config" / "default.yaml",
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        EMBEDDED, [f"embedded default not found; looked at {', '.join(map(str, candidates))}"]
    )


def _read_yaml(file: Path, source: str) -> Any:
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(source, [f"cannot read the file: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        line = file.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(source, [
            f"line {line}: expected UTF-8 text, found the byte 0x{exc.object[exc.start]:02X} "
            f"(byte {exc.start}): a binary file, or text saved in another encoding?"
        ]) from exc  # fmt: skip
    try:
        return load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [f"{where}not valid YAML ({problem})"]) from exc


def _overlay(base: Any, site: Any) -> Any:
    """``site`` over ``base``: mappings merge key by key, anything else replaces; a section
    left empty (``node:`` with nothing under it, which YAML reads as null) sets nothing."""
    if isinstance(base, dict) and site is None:
        return base
    if isinstance(base, dict) and isinstance(site, dict):
        merged = dict(base)
        for key, value in site.items():
            merged[key] = _overlay(base.get(key), value) if key in base else value
        return merged
    return site


def warnings_of(s: Settings) -> list[str]:
    """What is valid but most likely not what the site means (``check-config`` prints it,
    ``serve`` logs it at start)."""
    out: list[str] = []
    for n, d in enumerate(s.destinations):
        if d.failure_notice and d.objects and not {"sc", "sr"} & set(d.objects):
            out.append(
                f"destinations[{n}] ({d.name}): failure_notice is on, but its objects "
                f"({', '.join(d.objects)}) take neither Secondary Captures nor SRs, which is "
                "what a notice is made of: a planning system may refuse them"
            )
        if d.reject_replaced and d.objects and not {"sc", "sr"} & set(d.objects):
            out.append(
                f"destinations[{n}] ({d.name}): reject_replaced is on, but its objects "
                f"({', '.join(d.objects)}) are a planning system's: one rarely takes the Key "
                "Object Selection Documents that rejection notes are (check-destinations says)"
            )
    node = s.node
    if node.max_connections_per_host < node.max_associations:
        out.append(
            f"node.max_connections_per_host ({node.max_connections_per_host}) is below "
            f"max_associations ({node.max_associations}): a router, or senders behind one NAT "
            "address, cannot use every association the node takes"
        )
    stow = s.stow
    loopback = stow.bind_address in _LOOPBACK
    if stow.enabled and not s.node.tls.enabled and not loopback:
        out.append(
            f"stow: the STOW-RS receiver listens on {stow.bind_address} without TLS (node.tls "
            "is off): studies and any token or password cross the network in clear text"
        )
    for n, d in enumerate(s.destinations):
        web = d.dicomweb
        host = urllib.parse.urlsplit(web.url).hostname or ""
        credentials = web.token_file is not None or bool(web.username)
        if web.url.startswith("http://") and credentials and host not in _LOOPBACK:
            out.append(
                f"destinations[{n}] ({d.name}): {web.url} is plain http: the results and the "
                "token or password cross the network in clear text (use https)"
            )
    if not s.node.refuse_unknown_callers:
        if s.node.bind_address not in _LOOPBACK:
            out.append(
                f"node.refuse_unknown_callers is false and the node listens on "
                f"{s.node.bind_address}: any AE title from any host may send it studies"
            )
        return out
    source = next((d for d in s.destinations if d.name == s.retrieve.source), None)
    if (
        source is not None
        and s.retrieve.method == "move"
        and not source.dicomweb.url  # a DICOMweb source is read from, it never calls
        and not any(c.ae_title in ("*", source.ae_title) for c in s.node.allowed_callers)
    ):
        out.append(
            f"retrieve.source ({source.name}): node.allowed_callers does not let its AE title "
            f"{source.ae_title} in: the instances it sends on the node's C-MOVE requests "
            f"would be refused (add ae_title: {source.ae_title})"
        )
    for n, d in enumerate(s.destinations):
        if not d.storage_commitment:
            continue
        try:
            addr = ipaddress.ip_address(d.host)
        except ValueError:
            continue  # a host name: which addresses it reports from cannot be told here
        if not any(
            not c.hosts or any(addr in ipaddress.ip_network(h, strict=False) for h in c.hosts)
            for c in s.node.allowed_callers
        ):
            out.append(
                f"destinations[{n}] ({d.name}): storage_commitment is on, but "
                f"node.allowed_callers lets no caller in from {d.host}, where its storage "
                "commitment reports come from: each would be refused (add the PACS's AE title "
                f"with hosts: [{d.host}])"
            )
    return out


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def load_settings(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load and validate settings from ``path``, ``$GLIOFORECAST_CONFIG`` or the default."""
    if path is None:
        path = os.environ.get(ENV_CONFIG) or None
    default_file = default_config_path()
    default = _read_yaml(default_file, f"{EMBEDDED} ({default_file})")
    if path is None:
        return parse_settings(default, f"{EMBEDDED} ({default_file})")
    source = str(path)
    site = _read_yaml(Path(path), source)
    if site is None:
        site = {}
    if not isinstance(site, dict):
        raise ConfigError(source, [f"top level: expected a mapping, found {_found(site)}"])
    return parse_settings(_overlay(default, site), source)

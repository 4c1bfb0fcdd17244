"""The project's error hierarchy.

Every error says what was expected and what was found. Library code raises these; the network
boundary (``dicom_node.scp``) and the CLI translate them into DIMSE statuses and exit codes.
"""

from __future__ import annotations


class GlioforecastError(Exception):
    """Base class of every error the project raises on purpose."""


class ConfigError(GlioforecastError):
    """The configuration file is unreadable or does not validate.

    ``problems`` holds one line per problem, each naming the key, what was expected and what was
    found; ``source`` names the file (or ``<embedded default>``).
    """

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid configuration in {source}:\n{lines}")


class InputError(GlioforecastError):
    """Received data cannot be used as it is (bad dataset, bad geometry, missing role...)."""


class ConversionError(InputError):
    """A series, structure set or dose could not be turned into a volume or mask."""


class StorageError(GlioforecastError):
    """The spool or the job database could not record something."""


class OutOfSpaceError(StorageError):
    """Free space on the spool is below the configured minimum."""


class InferenceError(GlioforecastError):
    """The model could not produce a prediction."""


class ExportError(GlioforecastError):
    """An output DICOM object could not be built."""


class SendError(GlioforecastError):
    """An output object could not be delivered to a destination."""

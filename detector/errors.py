"""The few exceptions `detector` raises on purpose.

Every one of them means "the user gave us something we cannot use" and maps to exit code 2
in the CLI. Anything else escaping is a bug and should crash loudly.
"""


class DetectorError(Exception):
    """Root of every error `detector` raises deliberately."""


class ConfigError(DetectorError):
    """The YAML config is invalid. `problems` holds one line per problem, each naming its path."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid config {source}: {len(problems)} problem(s)\n{lines}")


class CheckpointError(DetectorError):
    """A checkpoint is missing, unreadable, tampered with, or does not fit the stream config."""


class InputError(DetectorError):
    """An input file cannot be read at all (missing, unknown format, no usable rows)."""

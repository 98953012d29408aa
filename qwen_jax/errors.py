"""User-facing errors. The CLI prints these as one line and exits non-zero; anything else is a bug."""

import json


class QwenJaxError(Exception):
    """Base class of every error caused by the user's input (config, checkpoint, arguments)."""


class ConfigError(QwenJaxError):
    """config.json (or an override) asks for something this model cannot do."""


class CheckpointError(QwenJaxError):
    """A checkpoint folder or file is missing, malformed, unsafe or does not match its config."""


def read_json(path: str, error: type[QwenJaxError] = CheckpointError, source: str | None = None):
    """The JSON value in the file ``path``; one that is not valid JSON (or not UTF-8) raises ``error``, naming
    ``source`` (default: the path)."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{source or path}: not valid JSON ({e})") from None

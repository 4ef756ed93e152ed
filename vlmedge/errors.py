"""The typed errors every vlmedge part raises for a user's mistake.

A message says what went wrong, what was expected, what was found and how to
fix it, in one line. CLIs print it as `error: ...` and exit 2; only bugs
produce tracebacks.
"""
from __future__ import annotations

import contextlib
import sys


class VlmedgeError(Exception):
    """Base of every error meant for the user rather than a traceback."""

    def __init__(self, what: str, *, expected: str | None = None, got: str | None = None,
                 hint: str | None = None):
        self.what, self.expected, self.got, self.hint = what, expected, got, hint
        parts = [what]
        if expected is not None:
            parts.append(f"expected {expected}")
        if got is not None:
            parts.append(f"got {got}")
        msg = "; ".join(parts)
        if hint:
            msg += f" ({hint})"
        # One line, whatever text from an untrusted input (a manifest key, a
        # prompt, a library's message) ended up in it.
        super().__init__(_one_line(msg))


def _one_line(text: str) -> str:
    """Every character that is not printable (newlines, ESC sequences, vertical
    tabs, line separators) escaped, so an error is one line that cannot
    drive the user's terminal."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class UserInputError(VlmedgeError, ValueError):
    """A bad argument or option value."""


class ModelDirError(VlmedgeError):
    """A Hugging Face model directory that cannot be used."""


class UnsupportedArchitectureError(ModelDirError):
    """A model whose architecture no registered family handles."""


class ArtifactError(VlmedgeError):
    """An artifact directory that is missing, corrupt, tampered with or too new."""


class MissingDependencyError(VlmedgeError, ImportError):
    """An optional heavy dependency (torch, tensorrt, ...) is not installed."""


class ContextOverflowError(VlmedgeError, ValueError):
    """Prompt + image tokens + new tokens exceed the model's context length."""


class SourceError(VlmedgeError):
    """A frame source (camera, stream, video file, folder) that cannot be
    opened or that failed while reading."""


class IncompleteAnswerError(VlmedgeError):
    """A constrained answer (choices, JSON schema) that max_new_tokens cut
    before it was whole: reported instead of returned as if it were valid."""


class ValidationError(VlmedgeError):
    """An exported model does not match its PyTorch reference."""


class TensorRTError(VlmedgeError):
    """A TensorRT engine build, engine load or CUDA call failed on the device."""


class CalibrationDataError(UserInputError):
    """Calibration data (--calib) that cannot be used: an empty or looping
    folder, too few readable images, a bad prompts.jsonl line."""


class AccuracyGateError(VlmedgeError):
    """A quantized model stays below its accuracy target even with the most
    harmful nodes kept in floating point."""


@contextlib.contextmanager
def cli_errors(prog: str):
    """Turns a VlmedgeError into one line on stderr and exit status 2."""
    try:
        yield
    except VlmedgeError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(130) from None

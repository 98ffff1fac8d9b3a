"""The project's error types. Every expected failure (a bad file, option, request or checkpoint)
is a ``StemGenError`` whose message names the problem and the fix; the CLI prints it as one
``error:`` line, the server as a 4xx JSON body."""


class StemGenError(ValueError):
    """Base of every user-facing error (a ValueError, so older callers still catch it)."""


class ModelFormatError(StemGenError):
    """A model directory, checkpoint or config is unusable; the message says what and how to fix it."""


class AudioError(StemGenError):
    """Unusable audio input or output; the message names the file and the fix."""


class RequestError(StemGenError):
    """An invalid generation request (options, context, target)."""


class OutputError(StemGenError):
    """An output could not be written (a full disk, a file-size limit, permissions); nothing half-written
    is left and a file it would have replaced is kept."""

"""The one error type of the export package."""


class ExportError(Exception):
    """An export a user asked for is impossible (unknown format, no adapter, no CUDA, unsupported model or
    tokenizer, missing quantizer); the command line prints it without a traceback."""

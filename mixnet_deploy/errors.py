"""The one error type users see: a clear line, exit code 2."""


class MixdeployError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and what to do."""

    exit_code = 2

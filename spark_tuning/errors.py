"""The two kinds of failure a user sees, and the exit codes the CLI gives them."""


class InputError(Exception):
    """Bad input (config, data, model, paths): the message names the problem, the value and the fix.

    Raised before expensive work wherever possible. The CLI exits with code 2.
    """

    exit_code = 2


class JobFailed(RuntimeError):
    """Something broke while running (a worker died, a write failed). The CLI exits with code 1."""

    exit_code = 1

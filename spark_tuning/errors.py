"""The two kinds of failure a user sees, and the exit codes the CLI gives them; a library error in one line."""

import re


class InputError(Exception):
    """Bad input (config, data, model, paths): the message names the problem, the value and the fix.

    Raised before expensive work wherever possible. The CLI exits with code 2.
    """

    exit_code = 2


class JobFailed(RuntimeError):
    """Something broke while running (a worker died, a write failed). The CLI exits with code 1."""

    exit_code = 1


def error_line(e: BaseException) -> str:
    """The cause of a Spark (py4j) error in one line: no py4j call ids ("o97.load"), no Java class names,
    no stack trace."""
    lines = [ln.strip().lstrip(":").strip() for ln in str(e).splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("An error occurred while calling", "at ", "JVM stacktrace",
                                                              "Traceback", "py4j."))]
    line = lines[0] if lines else type(e).__name__
    line = re.sub(r"^(?:[a-z_][\w$]*\.)+[A-Z][\w$]*(?:Exception|Error)\s*:?\s*", "", line)  # java.io.IOException:
    line = re.sub(r"\s*SQLSTATE:\s*\w+\.?", "", line)
    return (line[:300] + "...") if len(line) > 300 else (line or type(e).__name__)

"""One error type for bad user input, and the CLI wrapper that prints it as one line without a traceback."""
import functools
import sys


class UserError(Exception):
    """Bad input from the user (file, field or flag): shown as a single line, never with a traceback."""


def cli_main(fn):
    """Decorate an entry point: a UserError exits with status 2 and one line on stderr."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print("error: %s" % e, file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            sys.exit(130)
    return wrapper

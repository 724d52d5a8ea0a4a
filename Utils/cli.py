"""Command-line plumbing shared by every entry point: a parser whose errors are one-line UserErrors, and the one
boolean flag type (decision D3: `--flag` alone, or `--flag true|false|1|0|yes|no`; anything else is an error)."""
import argparse

from Utils.errors import UserError

TRUE_WORDS = ("true", "1", "yes")
FALSE_WORDS = ("false", "0", "no")


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag raises UserError (one line through `cli_main`) instead of printing the usage."""

    def error(self, message):
        raise UserError(message)


def parse_bool(text):
    """'true'/'1'/'yes' → True, 'false'/'0'/'no' → False (any case); argparse names the flag in the error."""
    v = str(text).strip().lower()
    if v in TRUE_WORDS:
        return True
    if v in FALSE_WORDS:
        return False
    raise argparse.ArgumentTypeError("%r is not a boolean (use true/false, 1/0 or yes/no)" % (text,))


def add_bool(parser, name, default, help=None, dest=None):
    """Add `--name` [true|false]: the bare flag means true. `parser` may be an argument group."""
    return parser.add_argument("--" + name, dest=dest or name, type=parse_bool, nargs="?", const=True,
                               default=default, metavar="true|false", help=help)


def is_bool_action(action):
    """Was this argparse action made by `add_bool`? (bench/ copies Math.py's flags and must keep their form.)"""
    return action.type is parse_bool

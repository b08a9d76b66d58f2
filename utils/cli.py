"""The command-line contract every script shares: bad input is one line, exit status 2."""

import argparse
import sys
import traceback


class UserInputError(ValueError):
    """Bad input from the user (a file, a record or an argument): reported as one line, no traceback."""


def fail(message):
    """Stop a script on bad input: `error: message` on stderr, exit status 2, no traceback."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def run_cli(main):
    """Run a script's main(): bad input becomes `error: ...` on stderr and exit status 2."""
    try:
        main()
    except UserInputError as err:
        fail(err)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        sys.exit(1)


def cli_flags(**options) -> list[str]:
    """Command-line flags from keyword arguments, in order: cli_flags(block_size=64, fsdp=True) gives
    ['--block_size', '64', '--fsdp']; an option that is False or None is left out."""
    flags = []
    for name, value in options.items():
        if value is None or value is False:
            continue
        flags.append(f"--{name}")
        if value is not True:
            flags.append(str(value))
    return flags


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, except None: the help text says what an unset option means."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)

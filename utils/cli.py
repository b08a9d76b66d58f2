"""The command-line contract every script shares: bad input is one line, exit status 2."""

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

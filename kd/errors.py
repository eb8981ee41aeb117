"""The one error type for bad input: the command line prints it as one line and exits with code 2."""


class UserError(Exception):
    """Bad input or configuration, said in one line that names the problem and the fix."""

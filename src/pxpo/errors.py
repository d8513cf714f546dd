"""The one exception type the CLI turns into a clear message and exit code 2."""


class PxpoInputError(Exception):
    """Bad user input: the message names the input (file, field) and the fix.

    Raised anywhere in pxpo for problems the user can correct; the CLI prints
    ``error: <message>`` and exits with status 2, leaving no partial artifact.
    """

    exit_code = 2

    def __init__(self, what: str, problem: str, fix: str):
        self.what = what
        self.problem = problem
        self.fix = fix
        super().__init__(f"{what}: {problem}. Fix: {fix}")

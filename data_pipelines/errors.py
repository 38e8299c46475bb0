"""The one exception type for input the user can fix.

`UserError` marks a bad file, flag or config value: the `xlsr-jax` command line prints its message on
one line (with the traceback only under `--verbose`), while any other exception is a bug and always
prints its traceback. It subclasses ValueError so that callers catching ValueError keep working. The
project's specific kinds (`ConfigError`, `AudioError`, `ModelDirError`, `ConversionError`,
`TrainingError`) derive from it; code raises a plain `UserError` for other bad input.
"""


class UserError(ValueError):
    """Input the user can fix; the message says what is wrong and, where it can, what to change."""

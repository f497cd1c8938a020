"""Errors that are the user's to fix: printed as one clear message, no traceback."""


class UserError(Exception):
    """Bad input (config, path, data). The CLI prints the message and exits with `exit_code`."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override that does not validate."""


EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpointed after a preemption signal, requeue me"


class Preempted(Exception):
    """A preemption signal (SIGTERM/SIGUSR1) reached some rank; every rank checkpointed and stops."""

    exit_code = EXIT_REQUEUE

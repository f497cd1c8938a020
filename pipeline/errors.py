"""Errors that are the user's to fix (printed as one clear message, no traceback) and the
exit codes the CLI promises."""

import signal


class UserError(Exception):
    """Bad input (config, path, data). The CLI prints the message and exits with `exit_code`."""

    exit_code = 2


class ConfigError(UserError):
    """A config file or override that does not validate."""


class NonFiniteLoss(UserError):
    """Training diverged: the losses stayed NaN/inf for max_nonfinite_steps steps, or fp16's
    dynamic loss scale fell to its minimum and still overflowed."""

    exit_code = 3


EXIT_REQUEUE = 75  # EX_TEMPFAIL: "checkpointed after a preemption signal, requeue me"
EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C
PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # what schedulers send before a kill


class Preempted(Exception):
    """A preemption signal (SIGTERM/SIGUSR1) reached some rank; every rank checkpointed and stops."""

    exit_code = EXIT_REQUEUE

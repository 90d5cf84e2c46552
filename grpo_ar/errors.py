"""Errors that tell the user what to change, and the one line the CLI prints for any error."""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A configuration value that must change; the message says which and how."""


def need(ok: bool, msg: str) -> None:
    """Raise ConfigError(msg) unless `ok`."""
    if not ok:
        raise ConfigError(msg)


class DataError(ValueError):
    """A malformed dataset row; the message names the source, row and field."""


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used as it is (bad input, exit 2)."""


class RunError(RuntimeError):
    """A fault while the run runs (rewards failing, a rank stopped, disk full): exit 1."""


class RanksLost(RunError):
    """A collective waited past trainer.dist_timeout_s: the process group is broken, and the
    process must exit without tearing it down (see `cli.main`)."""


BAD_INPUT, FAULT = 2, 1


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC, also as safetensors reports it (a message without errno or file)."""
    text = str(e)
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
        "os error 28" in text or "code: 28," in text or "No space left on device" in text
    )


def explain(e: BaseException) -> tuple[int, str]:
    """(exit code, message) for an error reaching the CLI: 2 for bad input, 1 for a fault at
    run time. Errors of our own say what to change already; OS errors get the file and a fix."""
    if isinstance(e, (ConfigError, DataError, CheckpointError)):
        return BAD_INPUT, str(e)
    if isinstance(e, RunError):
        return FAULT, str(e)
    if isinstance(e, OSError):
        return explain_os_error(e)
    if is_disk_full(e):  # safetensors' writer reports ENOSPC without the file
        return FAULT, f"disk full ({e}): free space, then continue with --resume RUN_DIR"
    return FAULT, (
        f"unexpected {type(e).__name__}: {e} (rerun with --debug for the traceback, and report "
        "it if the input looks right)"
    )


def explain_os_error(e: OSError) -> tuple[int, str]:
    where = f" {e.filename}" if e.filename is not None else ""
    if e.errno == errno.ENOSPC:
        return FAULT, f"disk full writing{where}: free space, then continue with --resume RUN_DIR"
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return BAD_INPUT, (
            f"no permission to use{where or ' a file'} ({e.strerror}): fix its permissions or "
            "choose another path (log.run_dir for outputs)"
        )
    if e.errno == errno.ENOENT:
        return BAD_INPUT, f"{where.strip() or 'a file'} does not exist: check the path"
    return FAULT, f"{e.strerror or e}{' (' + where.strip() + ')' if where else ''}"

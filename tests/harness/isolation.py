"""Run one sweep entry in a forked child, so that a crash, a hang or running out of memory fails that entry
only and the sweep goes on."""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable

from nnterp.validation.vllm import error_reason


def run_isolated(function: Callable[..., dict], args: tuple, timeout: float) -> dict:
    """``function(*args)`` in a forked child; its result, or a failure saying why the child gave none."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_child, args=(function, args, sender))
    process.start()
    sender.close()
    result: Any = None
    timed_out = not receiver.poll(timeout)
    if not timed_out:
        try:
            result = receiver.recv()
        except EOFError:
            pass
    process.join(10)
    if process.is_alive():
        process.kill()
        process.join()
    if isinstance(result, dict):
        return result
    if timed_out:
        return {"status": "fail", "reason": f"timeout after {timeout:.0f}s"}
    return {"status": "fail", "reason": f"process died (exit code {process.exitcode}, e.g. out of memory)"}


def _child(function: Callable[..., dict], args: tuple, connection) -> None:
    try:
        result = function(*args)
    except BaseException as error:  # the parent records the entry as failed instead of losing the sweep
        result = {"status": "fail", "reason": error_reason(error)}
    connection.send(result)
    connection.close()

"""Fault injection for the pipelines' error tests."""

from __future__ import annotations


def failing_on_call(function, call: int, error: BaseException):
    """``function``, except that its ``call``-th call raises ``error`` instead."""
    calls = [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise error
        return function(*args, **kwargs)

    return failing

"""Running ``asynchub serve`` under uvicorn, with a drain on SIGTERM (and Ctrl-C).

On the first SIGTERM or SIGINT the app drains (``Ops.draining``): readiness turns
false, new requests get 503 with ``Retry-After`` (``ops.py``), and the ones in flight
go on. The socket stays open meanwhile, so a client sent here by a balancer that has
not yet seen the readiness change gets a 503 it can retry elsewhere, not a refused
connection. Once nothing is in flight the server stops as uvicorn stops, and the
process exits 0: a drained stop is a clean one. If requests are still in flight after
``drain_timeout`` seconds, they are cut off and the process exits 1, so that a
supervisor sees that requests were lost. A second signal stops at once (exit 128 +
the signal's number, as a shell reports a death by it).

uvicorn's own handling stops at the first signal, waits for every connection without
a bound, and then raises the signal again, so SIGTERM ends the process with status
143: :class:`DrainingServer` overrides ``handle_exit`` and ``on_tick`` for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from types import FrameType
from typing import Any, Final

import uvicorn

from .ops import Ops

__all__ = ["DRAIN_TIMEOUT", "DrainingServer", "run"]

logger = logging.getLogger("asynchub.server")

#: Seconds in-flight requests get to finish after SIGTERM; Triton's --exit-timeout-secs
#: has the same default.
DRAIN_TIMEOUT: Final = 30.0
#: The exit status after a drain that ran out of time and cut requests off.
TIMED_OUT: Final = 1
#: uvicorn's exit status when the server never started (a port in use, say).
STARTUP_FAILURE: Final = 3


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM or SIGINT drains the app before it stops."""

    def __init__(self, config: uvicorn.Config, ops: Ops, drain_timeout: float) -> None:
        super().__init__(config)
        self.ops = ops
        self.drain_timeout = drain_timeout
        self.exit_code = 0
        self._began: float | None = None  # when the drain began
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: it runs between two steps of the event loop, so it only
        # sets flags; on_tick acts on them. Unlike uvicorn's, it does not keep the
        # signal to raise again after the stop (that made a drained SIGTERM exit 143).
        if self._began is None and not self.should_exit:
            self._began = time.monotonic()
            self.ops.draining = True
            return
        self.exit_code = 128 + sig
        self.should_exit = self.force_exit = True

    async def on_tick(self, counter: int) -> bool:
        began = self._began
        if began is not None and not self.should_exit:
            in_flight = self.ops.in_flight
            if not self._announced:
                self._announced = True
                logger.info(
                    "draining: %d request(s) in flight get up to %g s to finish; new ones get "
                    "503 (a second signal stops at once)",
                    in_flight,
                    self.drain_timeout,
                )
            left = began + self.drain_timeout - time.monotonic()
            if in_flight == 0:
                logger.info("drained in %.2f s", time.monotonic() - began)
                self.should_exit = True
                # What is left are idle connections and 503s being written.
                self.config.timeout_graceful_shutdown = max(1, int(left))
            elif left <= 0:
                logger.error(
                    "drain timeout (%g s): %d request(s) still in flight are cut off",
                    self.drain_timeout,
                    in_flight,
                )
                self.exit_code = TIMED_OUT
                self.should_exit = True
                self.config.timeout_graceful_shutdown = 0
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        await super().shutdown(sockets)
        if not self.exit_code:
            return
        # Requests were cut off. Their TensorFlow calls cannot be interrupted, and the
        # interpreter would wait for those threads at exit: leave now instead.
        if self.force_exit and self.started:
            # uvicorn skips the app's shutdown on a forced exit; it is quick (it closes
            # the hub and removes the temporary pack cache), so give it a moment.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1):
                    await self.lifespan.shutdown()
        logger.info("exiting with status %d", self.exit_code)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(self.exit_code)


def run(app: Any, *, drain_timeout: float = DRAIN_TIMEOUT, **config: Any) -> int:
    """Serve ``app`` (made by ``create_app``) as ``uvicorn.run(app, **config)`` does,
    draining on the first SIGTERM or SIGINT; return the exit status (0, or 3 if the
    server never started). A stop that cuts requests off exits the process itself.
    """
    server = DrainingServer(uvicorn.Config(app, **config), app.state.ops, drain_timeout)
    try:
        server.run()
    except KeyboardInterrupt:  # Ctrl-C before the server took the signal over
        return 130
    if not server.started:
        return STARTUP_FAILURE
    if server.exit_code:  # a second signal while it started: it never served
        return server.exit_code
    return 0

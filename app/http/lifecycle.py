"""Graceful shutdown for `vae serve`: drain on SIGTERM, then exit 0 by the deadline.

uvicorn alone stops listening at once and, after its own drain, re-raises the signal so the
process dies of it (exit -15). Here the first SIGTERM/SIGINT only starts draining: /readyz turns
503 (load balancers stop sending), new model work gets 503, and accepted requests run on. When
nothing is in flight uvicorn shuts down and `serve` returns 0. When requests are still in flight
shortly before `grace_seconds` (`abort_margin`), each gets a JSON 503 with Retry-After at once
(app.http.scheduler.Scheduler.abort), its model work stops at the next tile or frame, and the
server closes; a model call that cannot stop (one untiled forward pass) is left behind: the
process exits anyway (`os._exit`), so it is gone by `grace_seconds`, within an orchestrator's
kill timeout. A second signal is uvicorn's usual fast exit.

A model refused by warm-up (app.http.app: NaN or Inf out of a fixed latent) stops the server at
once: `serve` returns 2 with one line on stderr.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
import typing

import uvicorn

from app.http.scheduler import busy_threads
from app.protocol.errors import Unavailable

log = logging.getLogger("vae.server")


def begin_drain(app) -> None:
    """SIGTERM: /readyz turns 503 and new model work is refused; queued and running work finishes."""
    app.state.draining = True
    app.state.scheduler.closed = True


def abort_margin(grace: float) -> float:
    """How long before the grace period ends what is still in flight is answered 503: time for
    those answers and uvicorn's close (timeout_graceful_shutdown) to fit inside it."""
    return min(1.0, grace / 2)


def is_idle(app) -> bool:
    return app.state.http_in_flight == 0 and app.state.scheduler.idle


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, grace_seconds: float):
        super().__init__(config)
        self.app, self.grace = app, grace_seconds
        self.drain_started: float | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_started is None and sig in (signal.SIGTERM, signal.SIGINT):
            self.drain_started = time.monotonic()  # on_tick (every 0.1 s) takes it from here
            return
        super().handle_exit(sig, frame)

    async def on_tick(self, counter: int) -> bool:
        if self.app.state.startup_error and not self.should_exit:
            self.should_exit = True  # warm-up refused the model: `serve` exits 2
        if self.drain_started is not None and not self.should_exit:
            if not self.app.state.draining:
                begin_drain(self.app)
                log.info("draining: signal received, finishing accepted requests")
            waited = time.monotonic() - self.drain_started
            if is_idle(self.app):
                self.should_exit = True
            elif waited >= self.grace - abort_margin(self.grace):
                answered = self.app.state.scheduler.abort(lambda: Unavailable(
                    "the server is shutting down and its grace period is over: retry on another instance",
                    {"Retry-After": "1"}))
                log.warning("grace period of %.1f s over: %d requests answered 503", self.grace, answered)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app, settings) -> int:
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        log_config=None, access_log=False,  # app.http.observability writes the (JSON) access log
        timeout_graceful_shutdown=0.5,  # after the drain: stragglers (reading a body) get a JSON 503
    )
    DrainingServer(config, app, settings.grace_seconds).run()
    if app.state.startup_error:
        print(f"vae serve: error: {app.state.startup_error}", file=sys.stderr)
        return 2
    if busy_threads():  # a model call that could not stop: do not wait for it (the deadline is now)
        log.warning("exiting with %d model calls still running", busy_threads())
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def exit_process(code: int) -> typing.NoReturn:
    """End `vae serve` once the server has closed: atexit handlers (logging among them) and
    flushed stdio, then `os._exit`, skipping CPython's interpreter teardown.

    That teardown is a full garbage collection over every object of torch, diffusers & co. (the
    main thread in gc_collect_main under finalize_modules / interpreter_clear), all CPU: about 3 s
    in the CPU image on an idle core after one request, 4-10 s on a busy 2-core host, and minutes
    for a low-priority process on an overloaded one, where it outlasted .ci/container's 60 s stop
    window (and would outlast `docker stop`'s default 10 s): the process was still alive, in
    teardown, long after "Finished server process". Nothing the server holds needs it: the
    sockets are closed, the model threads idle (busy ones are handled above), files flushed."""
    import atexit

    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)

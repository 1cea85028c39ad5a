"""Graceful shutdown for `vae serve`: drain on SIGTERM, then exit 0.

uvicorn alone stops listening at once and, after its own drain, re-raises the signal so the
process dies of it (exit -15). Here the first SIGTERM/SIGINT only starts draining: /readyz turns
503 (load balancers stop sending), new model work gets 503, and accepted requests run to the
end. When nothing is in flight, or `grace_seconds` have passed, uvicorn shuts down normally and
`serve` returns 0. A second signal is uvicorn's usual fast exit.
"""

from __future__ import annotations

import logging
import signal
import time

import uvicorn

log = logging.getLogger("vae.server")


def begin_drain(app) -> None:
    """SIGTERM: /readyz turns 503 and new model work is refused; queued and running work finishes."""
    app.state.draining = True
    app.state.scheduler.closed = True


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
        if self.drain_started is not None and not self.should_exit:
            if not self.app.state.draining:
                begin_drain(self.app)
                log.info("draining: signal received, finishing accepted requests")
            waited = time.monotonic() - self.drain_started
            if is_idle(self.app) or waited >= self.grace:
                if waited >= self.grace:
                    log.warning("grace period of %.1f s over with requests still in flight", self.grace)
                self.should_exit = True
        return await super().on_tick(counter)


def serve(app, settings) -> int:
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        log_config=None, access_log=False,  # app.http.observability writes the (JSON) access log
        timeout_graceful_shutdown=2,  # after the drain: only stragglers past the grace period
    )
    DrainingServer(config, app, settings.grace_seconds).run()
    return 0

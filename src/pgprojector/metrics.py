"""The optional Prometheus endpoint (PGPROJECTOR_METRICS_PORT; needs the `metrics` extra)."""

from __future__ import annotations

from typing import Any

from pgprojector.errors import ConfigError


class Metrics:
    """The daemon's metrics, in a registry of their own. Every method is a no-op when disabled."""

    def __init__(self, port: int | None, addr: str = "0.0.0.0") -> None:
        self.port = port
        self._server: Any = None
        if port is None:
            return
        try:
            import prometheus_client as prom
        except ImportError:
            raise ConfigError("PGPROJECTOR_METRICS_PORT is set but prometheus-client is not installed: "
                              "pip install 'pgprojector[metrics]'") from None
        self.registry = prom.CollectorRegistry()
        labels = ["projection"]
        self.events_applied = prom.Counter("pgprojector_events_applied", "Events applied", labels,
                                           registry=self.registry)
        self.batch_seconds = prom.Histogram("pgprojector_batch_duration_seconds", "Time to apply and commit a batch",
                                            labels, registry=self.registry,
                                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.lag = prom.Gauge("pgprojector_lag_events", "Events in the log after the checkpoint", labels,
                              registry=self.registry)
        self.position = prom.Gauge("pgprojector_checkpoint_position", "Checkpoint position", labels,
                                   registry=self.registry)
        self.dead_letters = prom.Gauge("pgprojector_dead_letters", "Parked events", labels, registry=self.registry)
        self.halted = prom.Gauge("pgprojector_halted", "1 while the projection is halted", labels,
                                 registry=self.registry)
        self.reconnects = prom.Counter("pgprojector_reconnects", "Lost database connections recovered from",
                                       ["connection"], registry=self.registry)
        self._server, _thread = prom.start_http_server(port, addr=addr, registry=self.registry)

    @property
    def enabled(self) -> bool:
        return self.port is not None

    def batch(self, projection: str, events: int, seconds: float, checkpoint: int) -> None:
        if self.enabled:
            self.events_applied.labels(projection).inc(events)
            self.batch_seconds.labels(projection).observe(seconds)
            self.position.labels(projection).set(checkpoint)

    def reconnect(self, connection: str) -> None:
        if self.enabled:
            self.reconnects.labels(connection).inc()

    def projection_state(self, projection: str, position: int, lag: int, dead_letters: int, halted: bool) -> None:
        if self.enabled:
            self.position.labels(projection).set(position)
            self.lag.labels(projection).set(lag)
            self.dead_letters.labels(projection).set(dead_letters)
            self.halted.labels(projection).set(1 if halted else 0)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

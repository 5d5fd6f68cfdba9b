"""Prometheus metrics of a running coordinator, computed from the state database at scrape time."""

from __future__ import annotations

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, GaugeMetricFamily

from .state import State
from .status import snapshot


class StatusCollector:
    """Exposes round progress, per-client state and the latest global metrics as gauges."""

    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self):
        status = snapshot(self.state, live=True)
        yield GaugeMetricFamily("fedvlm_round", "Round being trained", value=status.get("round", 0))
        yield GaugeMetricFamily("fedvlm_rounds_total", "Rounds in the run", value=status.get("total_rounds", 0))
        yield GaugeMetricFamily("fedvlm_round_updates_accepted", "Accepted updates in the open round",
                                value=status.get("accepted", 0))
        clients = GaugeMetricFamily("fedvlm_client_state", "1 for the state each client is in",
                                    labels=["client", "state"])
        seen = GaugeMetricFamily("fedvlm_client_last_heartbeat_seconds", "Unix time of the last heartbeat",
                                 labels=["client"])
        for c in status["clients"]:
            clients.add_metric([c["name"], c["state"]], 1)
            seen.add_metric([c["name"]], c["last_heartbeat_unix"])
        yield clients
        yield seen
        evals = [r for r in status["rounds"] if r["eval_metrics"]]
        if evals:
            latest = GaugeMetricFamily("fedvlm_global_eval", "Example-weighted eval metric of the newest scored "
                                       "global", labels=["metric"])
            for key, value in evals[-1]["eval_metrics"].items():
                latest.add_metric([key], value)
            yield latest


def start_metrics(listen: str, state: State) -> None:
    """Serve /metrics on `listen` (HOST:PORT) from a background thread."""
    host, port = listen.rsplit(":", 1)
    REGISTRY.register(StatusCollector(state))
    start_http_server(int(port), addr=host)

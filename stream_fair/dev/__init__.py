"""Demo and development tooling: the embedded broker, synthetic streams, the demo and its local
Prometheus/Alertmanager. Not used by ``stream-fair run``; the sidecar never imports it."""

"""Pure detection core: no Kafka, Faust or Prometheus imports (enforced by ruff TID251 and a test)."""

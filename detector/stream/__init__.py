"""Faust adapters around the pure core: the app (topics, tables, agents), wire codec, worker and
plain aiokafka tools for the CLI. See :mod:`detector.stream.app` for the topology."""

"""Stream-processing fraud detector for web click-to-call / callback requests.

``detector.core`` is the pure decision logic; ``detector.stream`` wires it into Faust/Kafka;
``detector.sim`` generates labelled traffic; ``detector.cli`` is the ``detector`` command.
"""

__version__ = "0.1.0"

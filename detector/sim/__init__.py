"""Labelled traffic simulator: legitimate customers, attack scenarios, and the IP world they use.

``simulate(SimConfig(seed=1))`` gives a day of requests with ground truth; ``write_jsonl`` writes
them with labels in a side file; ``build_ip_databases`` writes MaxMind-format databases that agree
with the simulated addresses; ``campaign_windows`` gives the marketing campaigns a business would
have declared for the simulated day.
"""

from detector.sim.ipdb import (
    ANONYMOUS_FLAGS,
    HOSTING_ASNS,
    IP_PLAN,
    KINDS,
    IpBlock,
    block_of,
    blocks_for,
    build_ip_databases,
    cgnat_pools,
    random_ip,
    random_ip_in,
)
from detector.sim.populations import campaign_windows
from detector.sim.simulate import (
    ALL_SCENARIOS,
    LEGIT_LABELS,
    POPULATION_PER_DAY,
    POPULATIONS,
    SCENARIOS,
    VOLUME_PER_DAY,
    LabeledRequest,
    SimConfig,
    simulate,
    write_jsonl,
)

__all__ = [
    "ALL_SCENARIOS",
    "ANONYMOUS_FLAGS",
    "HOSTING_ASNS",
    "IP_PLAN",
    "KINDS",
    "LEGIT_LABELS",
    "POPULATIONS",
    "POPULATION_PER_DAY",
    "SCENARIOS",
    "VOLUME_PER_DAY",
    "IpBlock",
    "LabeledRequest",
    "SimConfig",
    "block_of",
    "blocks_for",
    "build_ip_databases",
    "campaign_windows",
    "cgnat_pools",
    "random_ip",
    "random_ip_in",
    "simulate",
    "write_jsonl",
]

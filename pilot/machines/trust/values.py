# -*- test-case-name: tests.machines.test_trust -*-
"""Trust's limits and the names of a peer's trust states (``docs/trust.md``)."""

#: A direct message older than this (seconds) is dropped.
MAX_AGE = 300.0
#: A direct message dated further ahead than this is dropped.
MAX_AHEAD = 30.0
#: How long a seen message is remembered; longer than the window it is accepted in.
REPLAY_MEMORY = 600.0
REPLAY_ENTRIES = 4096
#: Longest justification or reason kept or sent (the registry's limit).
MAX_TEXT = 1024
#: Requests kept waiting for an operator; more are dropped until some are answered.
MAX_PENDING = 1000

UNKNOWN = "unknown"
REQUESTED = "requested"
PENDING = "pending"
TRUSTED = "trusted"

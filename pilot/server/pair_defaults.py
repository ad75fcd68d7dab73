# -*- test-case-name: tests.services.test_replication -*-
"""
The default times of a rendezvous pair (``docs/deploy.md``), in a module of
their own: the pair's settings (:mod:`pilot.services.pairing`) take them
without importing the replication code, which a rendezvous without a pair
never loads (``docs/performance.md``, issue 16: restart).
"""

#: The reference standby's read deadline: a replication stream silent this long is dropped.
READ_DEADLINE = 45.0
#: A --sync-replication reply waits at most this long for a standby's acknowledgement.
SYNC_TIMEOUT = 2.0

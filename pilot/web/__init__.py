# -*- test-case-name: tests.web.test_dashboard -*-
"""
HTTP for operators: the rendezvous' dashboard and ``/api/stats``, and the
Prometheus ``/metrics`` of the rendezvous and of a node (``docs/operations.md``).

One module per job: ``stats`` reads the figures, ``page`` is the dashboard's
HTML, ``dashboard`` the twisted.web resources, ``metrics``, ``replication``
(a paired rendezvous') and ``nodemetrics`` the ``prometheus_client``
collectors.  ``pilot.services.web`` listens.
"""

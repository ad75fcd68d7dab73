"""Rendezvous server logic: registry and beacon, pure (time from an injected clock)."""

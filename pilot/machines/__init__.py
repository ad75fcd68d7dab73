"""State machines (Automat): time from an injected clock, outputs through injected collaborators, no I/O."""

"""The embedded stack: PostgreSQL and the Temporal dev server from their wheels, supervised."""

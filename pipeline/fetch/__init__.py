"""pipeline.fetch: I/O only; reading imagery onto the working grid with provenance."""

"""Programs that put usage into the pipeline: the demo traffic (and, later, gateway, simulator,
replay)."""

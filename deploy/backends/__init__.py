"""One module per way of starting a Topology; each takes the same Topology."""

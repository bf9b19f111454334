"""geoseg."""

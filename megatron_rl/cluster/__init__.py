"""Multi-node runs on Ray: trainer ranks and separate rollout engines as actors (see docs/cluster.md)."""

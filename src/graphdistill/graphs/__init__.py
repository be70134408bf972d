"""graphdistill.graphs."""

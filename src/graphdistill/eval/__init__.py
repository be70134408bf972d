"""graphdistill.eval."""

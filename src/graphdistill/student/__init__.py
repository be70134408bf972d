"""graphdistill.student."""

"""graphdistill.teachers."""

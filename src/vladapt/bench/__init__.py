"""vladapt.bench."""

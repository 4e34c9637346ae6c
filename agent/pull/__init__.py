"""Pre-pulling images through the CRI: keep every listed image present and pinned."""

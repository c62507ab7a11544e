"""Outside baselines LC-Net is measured against (optional extras)."""

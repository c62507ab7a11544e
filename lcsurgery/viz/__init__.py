"""Figures (PNG, matplotlib): trade-offs, extreme images, channel heat maps, MAC histograms, skip rates."""

"""Building blocks added to models: the ReLU-1 gate activation."""

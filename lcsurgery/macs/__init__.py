"""Dynamic MAC accounting: fvcore static costs per piece, exact per-image counts from hard gates."""

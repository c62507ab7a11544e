"""torch.fx analysis: leaf-aware tracing, dominators, residual block discovery, outlining."""

"""probprune_kernels: masked GEMMs, masked attention and mask ops, K sampled masks in one launch."""

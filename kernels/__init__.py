"""Attention kernels over the tiers (imported as ``kvtier.kernels``); each module keeps its torch reference."""

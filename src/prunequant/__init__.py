"""prunequant: joint pruning and quantization of causal LMs."""

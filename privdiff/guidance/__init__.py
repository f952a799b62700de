"""DP Universal Guidance: DP style targets from private images, and guided sampling toward them."""

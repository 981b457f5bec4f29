"""Measurements over arrays: what a region computes, told from the values a View gives (pure numpy,
no graph access), written once for both front-ends."""

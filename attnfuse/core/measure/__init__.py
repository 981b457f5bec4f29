"""What a construct computes, measured over the arrays a View returns: pure numpy, no graph."""

"""Experiments built on the library: the paper's GMM and BNN protocols. Not imported by the core."""

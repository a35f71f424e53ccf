"""refinevla: ReFineVLA (arXiv 2505.19080) as a small, readable library.

Stages (one module each): data -> teacher (annotate) -> train (fine-tune) -> evaluate -> attention -> book.
"""
__version__ = "0.1.0"

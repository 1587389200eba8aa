"""Search over image embeddings: a folder of images embedded once and cached
(:mod:`~albef.search.gallery`, what ``albef serve`` searches), and FAISS indexes for galleries
too large for an exact scan (:mod:`~albef.search.ann`, ``albef index``)."""

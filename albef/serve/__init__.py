"""``albef serve``: a local web demo — text → image search, caption matching, VQA and Grad-CAM."""

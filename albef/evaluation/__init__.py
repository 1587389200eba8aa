"""Evaluation: retrieval, grounding, classification and VQA."""

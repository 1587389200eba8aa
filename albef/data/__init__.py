"""Datasets, transforms and data builders."""

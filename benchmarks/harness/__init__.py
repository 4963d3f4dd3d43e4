"""Test and benchmark harnesses that need more than a Python process (root, network namespaces)."""

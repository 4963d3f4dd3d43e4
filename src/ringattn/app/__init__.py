"""The demo application built on the library: a Llama-style model (``model``), its synthetic tasks
(``data``), training (``train``), generation (``generate``) and their flag metadata (``config``).

Nothing in the library imports it; the CLI (``ringattn.cli``) and the benchmarks do.
"""

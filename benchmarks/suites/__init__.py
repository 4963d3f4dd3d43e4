"""One module per suite, each with ``run(out: pathlib.Path, quick: bool) -> dict`` and ``summary(result)``."""

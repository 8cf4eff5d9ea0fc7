"""`kvrec serve` and `kvrec bench serve`: registered by the server package."""


def register(sub, bench_sub) -> None:
    """Placeholder until the service lands (issue: ranking service)."""

"""`kvrec bench offline`: registered by the compression package."""


def register_bench(bench_sub) -> None:
    """Placeholder until the offline benchmark lands (issue: compression policies)."""

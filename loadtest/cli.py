"""`kvrec sweep`: registered by the loadtest package."""


def register(sub) -> None:
    """Placeholder until the sweep lands (issue: Locust replay)."""

"""The replay user under a step-load shape: `locust -f loadtest/stepload.py --host ... --headless`.

Adds `--step-users` users every `--step-seconds` for `--steps` steps, then ends the test, so one run
shows how latency grows with concurrency. A separate file because Locust uses any shape class it
finds in the locustfile, and the plain replay must keep `-u/-r/-t`. Load only this file, not this
and locustfile.py together (the replay's hooks would be registered twice).
"""

from kvrec.loadtest.locustfile import ReplayUser  # noqa: F401  (the user class Locust runs)
from kvrec.loadtest.options import ReplayOptions
from locust import LoadTestShape


class StepLoadShape(LoadTestShape):
    """(users, spawn rate) per tick: step n (from 0) runs (n + 1) * step_users users."""

    def tick(self) -> tuple[int, float] | None:
        opts = ReplayOptions.from_namespace(self.runner.environment.parsed_options)
        step = int(self.get_run_time() // opts.step_seconds)
        if step >= opts.steps:
            return None
        return (step + 1) * opts.step_users, float(opts.step_users)

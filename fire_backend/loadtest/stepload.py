"""Opt-in step load: add ``loadtest/stepload.py`` to ``-f`` (a shape class in a locustfile is always used).

    locust -f loadtest/locustfile.py,loadtest/stepload.py --headless --host grpc://127.0.0.1:8001 \\
        --step-users 4 --step-time 10 --step-count 4 --csv out/step --csv-full-history

Starts at --step-users users and adds --step-users every --step-time seconds, --step-count steps in all, then
stops (4, 8, 12, 16 users for 10 s each by default); -u, -r and -t are ignored. With --csv-full-history the
``_stats_history.csv`` shows throughput and latency per step. The options are registered with the users.
"""

from __future__ import annotations

from locust import LoadTestShape


class StepLoadShape(LoadTestShape):
    """users = step_users * (step + 1) for step in 0 .. step_count-1, each step lasting step_time seconds."""

    use_common_options = False

    def tick(self):
        options = self.runner.environment.parsed_options
        step_users = max(1, int(getattr(options, "step_users", 4)))
        step_time = max(0.1, float(getattr(options, "step_time", 10.0)))
        step_count = max(1, int(getattr(options, "step_count", 4)))
        step = int(self.get_run_time() // step_time)
        if step >= step_count:
            return None
        users = step_users * (step + 1)
        return users, float(users)  # spawn each step's new users within about a second

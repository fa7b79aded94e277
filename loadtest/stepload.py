"""Opt-in step load for loadtest/locustfile.py; see ``fire_backend.loadtest.stepload``.

    locust -f loadtest/locustfile.py,loadtest/stepload.py --headless --host grpc://127.0.0.1:8001 \\
        --step-users 4 --step-time 10 --step-count 4 --csv out/step --csv-full-history
"""

from fire_backend.loadtest.stepload import StepLoadShape

__all__ = ["StepLoadShape"]

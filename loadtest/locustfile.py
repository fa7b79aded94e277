"""Locust load test for a FIRE Triton server, with live defense accuracy (see loadtest/README.md).

    locust -f loadtest/locustfile.py --help        # Locust's options and FIRE's: traffic mix, attack, protocol
    locust -f loadtest/locustfile.py --host grpc://127.0.0.1:8001 \\
        --clean-npz clean.npz --poisoned-npz poisoned.npz --poison-ratio 0.2 --target 0 --batch 8
    locust -f loadtest/locustfile.py --host http://127.0.0.1:8000 --headless -u 16 -r 16 -t 60s --csv out/run
    locust -f loadtest/locustfile.py --host grpc://127.0.0.1:8001 --processes 2 ...     # distributed, 2 workers

The users, options and reports live in ``fire_backend.loadtest`` (installed with the package).
"""

from fire_backend.loadtest.users import FireGrpcUser, FireHttpUser

__all__ = ["FireGrpcUser", "FireHttpUser"]

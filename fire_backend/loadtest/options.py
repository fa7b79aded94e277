"""The FIRE options of ``locust -f loadtest/locustfile.py``: traffic mix, attack and model, protocol, step load.

Registered on Locust's ``init_command_line_parser`` event by ``users``; ``--help`` lists them because
``fire_backend.loadtest.help`` imports the locustfile before Locust builds its help.
"""

from __future__ import annotations

from fire_backend.wire.names import BYPASS_PARAMETER, DEFAULT_MODEL, INFERENCE_MODELS

#: the option groups, as --help shows them
GROUPS = ("FIRE traffic mix", "FIRE attack and model", "FIRE protocol", "FIRE step load")


def _add(group, *flags, web: bool = True, **kwargs):
    # Argument groups bypass LocustArgumentParser.add_argument, which tags the actions the web UI shows.
    action = group.add_argument(*flags, **kwargs)
    action.include_in_web_ui, action.is_secret, action.is_required, action.is_multiple = web, False, False, False
    return action


def add_options(parser, **_kw) -> None:
    mix, attack, protocol, step = (parser.add_argument_group(title) for title in GROUPS)
    _add(mix, "--clean-npz", default="", metavar="FILE",
         help="clean images (.npz from `fire data export`); default: the embedded digits test images")
    _add(mix, "--poisoned-npz", default="", metavar="FILE",
         help="poisoned images (.npz from `fire data export --poisoned`); its y are the true labels")
    _add(mix, "--poison-ratio", type=float, default=0.2, metavar="R",
         help="fraction of requests that carry poisoned images (0.2: an 80/20 clean/poisoned mix)")
    _add(mix, "--batch", type=int, default=1, metavar="N", help="images per request (1; at most 64)")
    _add(attack, "--target", type=int, default=0, metavar="T", help="attack target label, for ASR (0)")
    _add(attack, "--model", default=DEFAULT_MODEL, metavar="NAME",
         help=f"{' | '.join(INFERENCE_MODELS)} ({DEFAULT_MODEL})")
    _add(attack, "--bypass", action="store_true", default=False,
         help=f"send {BYPASS_PARAMETER}=true, signed with the control token from the environment: "
              f"{DEFAULT_MODEL} skips the repair (measures the bare attack; the repository must allow bypass)")
    _add(protocol, "--protocol", choices=["auto", "grpc", "http"], default="auto",
         help="auto (default): from the --host scheme, grpc://H:P or http://H:P; a bare H:P is gRPC")
    _add(protocol, "--request-timeout", type=float, default=30.0, metavar="S", help="seconds per request (30)")
    _add(protocol, "--latency-file", default="", metavar="FILE", web=False,
         help="write each request's start time, latency (ms) and image count to this CSV at the end (workers "
         "append .PID); `fire bench` uses it for exact percentiles")
    _add(step, "--step-users", type=int, default=4, metavar="N", web=False,
         help="users added per step (4); only with -f loadtest/locustfile.py,loadtest/stepload.py")
    _add(step, "--step-time", type=float, default=10.0, metavar="S", web=False, help="seconds per step (10)")
    _add(step, "--step-count", type=int, default=4, metavar="K", web=False,
         help="steps; the test stops after the last (4)")


def parsed_options(environment):
    """The environment's parsed options; Locust used as a library without a parser gets the defaults."""
    if environment.parsed_options is None:
        from locust.argument_parser import get_parser

        environment.parsed_options = get_parser().parse_args([])
    return environment.parsed_options

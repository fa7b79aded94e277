"""`fire demo`'s summary table (issue 26): latency per request beside the images a request carries and the requests
in flight, so the stream's 8-image requests and Locust's 1-image ones are not read as one per-sample scale. (The
demo itself serves for real; tests/integration covers the parts it runs.)"""

from __future__ import annotations

import pytest

from fire_backend.cli import main
from fire_backend.cli.demo import summary_table


def figures(p50_ms: float, images: int, in_flight: int) -> dict:
    return {"ca": 0.9975, "pa": 0.9861, "asr": 0.0056, "p50_ms": p50_ms, "samples_per_s": 1222.0,
            "images_per_request": images, "in_flight": in_flight}


def test_the_table_names_the_request_size_and_concurrency_of_each_row() -> None:
    summary = {"before": figures(5.3, 8, 1), "after": figures(6.6, 8, 1), "load": figures(11.0, 1, 8)}
    lines = summary_table(summary, flagged=20, users=8)
    header = lines[1].split()
    assert header[:3] == ["CA", "PA", "ASR"] and "ms/request" in lines[1] and "img/request" in lines[1]
    after, load = lines[3].split(), lines[4].split()
    assert after[:3] == ["after", "(20", "flagged"] and after[-4:] == ["8", "1", "6.600", "1222"]
    assert load[:4] == ["Locust", "load", "(8", "users)"] and load[-4:] == ["1", "8", "11.000", "1222"]
    assert "never the 20 observed ones" in lines[-2] and "several in flight" in lines[-1]


def test_demo_help_has_examples(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "examples:\n  fire demo" in capsys.readouterr().out

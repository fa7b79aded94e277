"""Locust load tests of a FIRE server: per-sample latency, throughput and live defense accuracy.

Locust loads ``locustfile.py`` (this package's, ``LOCUSTFILE``, or the source tree's ``loadtest/locustfile.py``,
the same one import) by path; everything else lives in modules imported by name, so the event listeners they
register exist once per process whichever entry point Locust was given.
"""

from pathlib import Path

#: the Locust entry point that ships with the package (`fire bench` and `fire demo` run it; works from a wheel)
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
#: ``--csv PREFIX`` writes the FIRE tables to PREFIX + these suffixes (beside Locust's own PREFIX_stats.csv)
DEFENSE_CSV_SUFFIX = "_defense.csv"
DEFENSE_HISTORY_CSV_SUFFIX = "_defense_history.csv"
PER_SAMPLE_CSV_SUFFIX = "_per_sample.csv"

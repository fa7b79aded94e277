"""The kinds of direction-store damage a reader meets, and the listener that hears of them.

Separate from :mod:`fire_backend.stores.format` and the engines (which need torch) so that the metrics, which count
them as ``fire_store_errors_total{kind=...}``, stay torch-free, and the store itself knows nothing of Triton: a stage
hands the store a :data:`DamageListener` (its metrics' ``store_error``) and the store calls it where it finds
damage.
"""

from __future__ import annotations

from collections.abc import Callable

#: a version file that exists but does not verify (checksum, header or payload)
CHECKSUM = "checksum"
#: a history line that is torn or fails its own checksum
TORN_LINE = "torn_line"
#: a ``CURRENT`` pointer that exists but cannot be read or parsed
UNREADABLE_POINTER = "unreadable_pointer"
#: a version that verifies but does not fit the served network (layer names, shapes, bounds)
SHAPE = "shape"
KINDS = (CHECKSUM, TORN_LINE, UNREADABLE_POINTER, SHAPE)

#: called with one of KINDS each time a reader meets that damage (it must not raise, and must be cheap)
DamageListener = Callable[[str], None]

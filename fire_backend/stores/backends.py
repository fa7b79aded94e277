"""Which direction store a repository uses, chosen by URL, and the interface every store offers.

    file:///srv/fire/store                       a store directory (the embedded default: <repository>/artifacts/store)
    etcd://10.0.0.5:2379/fire/prod               etcd, keys under /fire/prod (one prefix per deployment)
    etcd://etcd:2379/fire/prod?ca=/tls/ca.crt&cert=/tls/client.crt&key=/tls/client.key
                                                 the same over TLS with a client certificate

The file store serves one host (or a shared volume); etcd serves many replicas (docs/store-engine.md argues the
choice). Both give the same guarantees; they differ in how writers serialise (a lock, or compare-and-set: see
:class:`StoreBackend`) and in how a repair instance hears of a new version (one ``stat`` per batch, or a watch
thread). Nothing here connects: :func:`open_store` only parses and builds.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from urllib.parse import parse_qsl, urlsplit

from fire_backend.defaults import RETAIN_VERSIONS

if TYPE_CHECKING:  # the stores import torch (the CLI imports this module without it); ssl only with TLS
    import ssl

    from fire_backend.stores.damage import DamageListener
    from fire_backend.stores.format import DirectionSet, FitCheck, LayeredSet, LiveState, Version

#: overrides the repository's store URL for every stage of a server (``fire serve --store`` sets it)
STORE_URL_ENV = "FIRE_STORE_URL"
SCHEMES = ("file", "etcd")
#: seconds one etcd request may take before it counts as unreachable
ETCD_TIMEOUT_S = 2.0
TLS_OPTIONS = ("ca", "cert", "key")


class RepairFollower(Protocol):
    """What a repair instance asks before each batch: did the version to apply change, and what is it now.

    ``poll()`` never raises and never blocks on the engine. ``committed``: when the version it holds was committed
    (None for the version it started with: no propagation). ``held``: no verified version yet (the stage refuses
    requests rather than serve without the committed defence). ``damage``: what is wrong with the store as this
    instance sees it (empty when healthy); ``degraded``: held or damaged. ``recheck()``: a full look whatever changed
    (the idle watcher's, while degraded). ``report()``: record what the instance applies where ``status`` reads it
    (called off the serving path; OSError or the engine's error when it cannot).
    """

    current: Version | None
    committed: float | None
    held: bool
    damage: tuple[str, ...]

    @property
    def version(self) -> int: ...

    @property
    def degraded(self) -> bool: ...

    def poll(self) -> bool: ...

    def recheck(self) -> bool: ...

    def report(self) -> bool: ...

    def close(self) -> None: ...


class StoreBackend(Protocol):
    """A direction store. ``locked()`` makes a read-derive-commit block atomic: the file store holds an ``flock``;
    etcd runs it optimistically and raises :class:`fire_backend.stores.format.Conflict` from a commit when another
    writer got in first, so writers run such blocks in a retry loop."""

    def initialize(self) -> None: ...

    def recover(self) -> None: ...

    def locked(self) -> contextlib.AbstractContextManager[None]: ...

    def resolve(self) -> LiveState: ...

    def read_version(self, number: int) -> Version: ...

    def history(self) -> list[dict]: ...

    def claim_nonce(self, nonce: str, ttl_s: float) -> bool: ...

    def commit(self, directions: DirectionSet | LayeredSet, action: str, actor: str = "local",
               note: dict | None = None) -> int: ...

    def rollback(self, number: int, actor: str = "local", note: dict | None = None) -> int: ...

    def committed_at(self, number: int, sha256: str = "") -> float | None: ...

    def instances(self) -> list[dict]: ...

    def instance_entries(self) -> list[dict]: ...

    def follower(self, instance: str) -> RepairFollower: ...


def open_store(url: str, default_root: Path | None = None, on_damage: DamageListener | None = None, *,
               fits: FitCheck | None = None, registry_dir: Path | None = None,
               retain: int = RETAIN_VERSIONS) -> StoreBackend:
    """The store ``url`` names (empty: the file store at ``default_root``); ValueError naming the fix.

    ``on_damage`` hears of each damaged part the store meets (a stage passes its metrics' ``store_error``);
    ``fits`` checks every version against the served network; ``registry_dir`` is where a file store's repair
    instances record what they apply (etcd keeps its records under the prefix); ``retain``: how many versions a
    file store keeps the payload files of."""
    from fire_backend.stores.files import DirectionStore
    from fire_backend.stores.instances import InstanceRegistry

    def file_store(root: Path) -> StoreBackend:
        registry = InstanceRegistry(registry_dir) if registry_dir is not None else None
        return DirectionStore(root, on_damage, fits=fits, registry=registry, retain=retain)

    if not url:
        if default_root is None:
            raise ValueError("no store URL given")
        return file_store(default_root)
    scheme, sep, rest = url.partition("://")
    if not sep or scheme not in SCHEMES:
        raise ValueError(f"store URL {url!r}: use file:///DIR or etcd://HOST:PORT/PREFIX")
    if scheme == "file":
        if not rest.startswith("/"):
            raise ValueError(f"store URL {url!r}: name an absolute directory, e.g. file:///srv/fire/store")
        return file_store(Path(rest))
    return _etcd_store(url, on_damage, fits)


def _etcd_store(url: str, on_damage: DamageListener | None, fits: FitCheck | None) -> StoreBackend:
    from fire_backend.stores.etcd.client import EtcdClient
    from fire_backend.stores.etcd.store import EtcdStore

    parts = urlsplit(url)
    if "," in parts.netloc:
        raise ValueError(f"store URL {url!r}: name one endpoint (a Service in front of the etcd cluster, which "
                         "spreads connections over its members)")
    if "@" in parts.netloc:
        raise ValueError(f"store URL {url!r}: user:password is not supported; authenticate with a client "
                         "certificate (?ca=&cert=&key=)")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not host or not port:
        raise ValueError(f"store URL {url!r}: name the endpoint as host:port, e.g. etcd://127.0.0.1:2379/fire/prod")
    if not parts.path.strip("/"):
        raise ValueError(f"store URL {url!r}: name a key prefix, e.g. etcd://{host}:{port}/fire/prod")
    options = dict(parse_qsl(parts.query))
    unknown = sorted(set(options) - set(TLS_OPTIONS))
    if unknown:
        raise ValueError(f"store URL {url!r}: unknown option {unknown[0]!r} (allowed: {', '.join(TLS_OPTIONS)})")
    return EtcdStore(EtcdClient(host, port, ETCD_TIMEOUT_S, _tls(url, options)), parts.path, url, on_damage, fits)


def _tls(url: str, options: dict[str, str]) -> ssl.SSLContext | None:
    """HTTPS to etcd when ``ca`` is given; ``cert``/``key``: our client certificate (etcd --client-cert-auth)."""
    if not options:
        return None
    try:
        import ssl
    except ImportError as exc:  # seen in a Python-backend stub whose libpython is older than the stdlib it loads
        raise ValueError(f"store URL {url!r}: TLS needs Python's ssl module, which does not load here "
                         f"({exc})") from None
    if "ca" not in options or ("key" in options and "cert" not in options):
        raise ValueError(f"store URL {url!r}: TLS needs ca= (and cert= with key= for a client certificate)")
    try:
        context = ssl.create_default_context(cafile=options["ca"])
        if "cert" in options:
            context.load_cert_chain(options["cert"], options.get("key"))
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"store URL {url!r}: cannot load the TLS files ({exc})") from None
    return context

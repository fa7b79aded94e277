"""Choosing the direction store by URL: what each form opens, and a clear error for each malformed one or, at
`fire serve --store`, what it says of a store that does not answer (the etcd store's own tests run a real engine:
tests/integration/test_etcd_store.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fire_backend.cli import main
from fire_backend.cli.serving import check_store
from fire_backend.repository.layout import MODELS_DIR, STORE_DIR, ServingSettings, repository_store
from fire_backend.stores.backends import STORE_URL_ENV, open_store
from fire_backend.stores.etcd.local import free_port
from fire_backend.stores.etcd.store import EtcdStore
from fire_backend.stores.files import DirectionStore
from fire_backend.wire.names import FIRE_ENSEMBLE


def test_no_url_is_the_file_store_in_the_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    settings = ServingSettings(layer="b", input_shape=(1, 4, 4), latent_shape=(16,), num_classes=10, arch="t")
    store = repository_store(tmp_path, settings)
    assert isinstance(store, DirectionStore) and store.root == tmp_path / STORE_DIR


def test_the_environment_overrides_the_built_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = ServingSettings(layer="b", input_shape=(1, 4, 4), latent_shape=(16,), num_classes=10, arch="t",
                               store=f"file://{tmp_path}/built")
    assert repository_store(tmp_path, settings).root == tmp_path / "built"
    monkeypatch.setenv(STORE_URL_ENV, "etcd://10.0.0.5:2379/fire/prod")
    store = repository_store(tmp_path, settings)
    assert isinstance(store, EtcdStore)
    assert (store.client.host, store.client.port, store.prefix, store.client.tls) == ("10.0.0.5", 2379, b"/fire/prod",
                                                                                       None)


def test_tls_options_load_the_named_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot load the TLS files"):
        open_store(f"etcd://etcd:2379/fire?ca={tmp_path}/missing.crt")


@pytest.mark.parametrize(("url", "message"), [
    ("redis://h:6379/0", "use file:///DIR or etcd://HOST:PORT/PREFIX"),
    ("/srv/store", "use file:///DIR"),
    ("file://relative/dir", "absolute directory"),
    ("etcd://h:2379", "name a key prefix"),
    ("etcd://h:2379/", "name a key prefix"),
    ("etcd://h/fire", "host:port"),
    ("etcd://h:notaport/fire", "host:port"),
    ("etcd://a:2379,b:2379/fire", "one endpoint"),
    ("etcd://user:pw@h:2379/fire", "client certificate"),
    ("etcd://h:2379/fire?timeout=3", "unknown option 'timeout'"),
    ("etcd://h:2379/fire?cert=c.crt", "TLS needs ca="),
])
def test_a_malformed_url_is_refused_with_the_fix(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("?", r"\?")):
        open_store(url)


def fake_repository(root: Path) -> Path:
    (root / MODELS_DIR / FIRE_ENSEMBLE).mkdir(parents=True)
    (root / MODELS_DIR / FIRE_ENSEMBLE / "config.pbtxt").write_text("")
    return root


def test_fire_serve_starts_on_a_store_that_does_not_answer_and_says_so(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    """Issue 25: a replica started while etcd is down (or a file store's volume not mounted yet) must not exit: its
    repair stages hold requests (/ready 503) and keep trying. `fire serve` says once what it found; it never
    creates a missing file store (a new one at version 0 would serve no defence)."""
    url = f"etcd://127.0.0.1:{free_port()}/fire/prod"  # nothing listens there
    assert check_store(url) == url
    assert "the etcd store is unreachable" in capsys.readouterr().err
    missing = tmp_path / "volume" / "store"
    assert check_store(f"file://{missing}") == f"file://{missing}"
    assert "store directory missing" in capsys.readouterr().err and not missing.exists()
    DirectionStore(missing).initialize()
    check_store(f"file://{missing}")
    assert "live version 0" in capsys.readouterr().out


def test_fire_serve_refuses_a_malformed_store_url(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["serve", "--repository", str(fake_repository(tmp_path)), "--store", "etcd://h:2379"]) == 2
    assert "name a key prefix" in capsys.readouterr().err

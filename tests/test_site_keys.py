"""Site keys revoked: removed from the credentials folder, then unregistered at the coordinator by their recorded node ids."""

import json

import pytest

from coordinator.certs import add_site, init_credentials, remove_site
from coordinator.deployment import StateLayout, check_credentials
from shared.errors import ConfigError


@pytest.fixture()
def credentials(tmp_path):
    folder = tmp_path / "credentials"
    init_credentials(folder, ["localhost"], ["Alpha Clinic", "beta"], days=1)
    return folder


def test_a_removed_site_leaves_the_folder_and_its_listing_and_an_unknown_site_is_named(credentials):
    removed = remove_site(credentials, "beta")
    assert sorted(path.name for path in removed) == ["beta.key", "beta.pub"]
    assert not (credentials / "sites" / "beta.pub").exists() and (credentials / "sites" / "alpha-clinic.pub").exists()
    assert "beta" not in (credentials / "README.txt").read_text()
    with pytest.raises(ConfigError, match="no key of site 'beta'; its sites are: 'Alpha Clinic'"):
        remove_site(credentials, "beta")


class _SuperLink:
    """What `flwr supernode register/unregister --format json` answers, with the keys it holds."""

    def __init__(self) -> None:
        self.keys: dict[int, str] = {}
        self.next_id = 100
        self.calls: list[list[str]] = []

    def __call__(self, layout, arguments, timeout=120.0):
        self.calls.append(list(arguments))
        action, target = arguments[1], arguments[2]
        if action == "register":
            key = open(target).read().split()[1]
            if key in self.keys.values():
                return {"success": False, "error-message": "Public key already in use"}
            self.next_id += 1
            self.keys[self.next_id] = key
            return {"success": True, "node-id": str(self.next_id)}
        del self.keys[int(target)]
        return {"success": True}


def test_sync_registers_every_key_and_unregisters_removed_and_replaced_ones(credentials, tmp_path, monkeypatch):
    from coordinator import site_keys

    superlink = _SuperLink()
    monkeypatch.setattr(site_keys, "run_flower_cli", superlink)
    layout = StateLayout(tmp_path / "state")
    layout.root.mkdir()
    said = []
    site_keys.sync_site_keys(layout, check_credentials(credentials), said.append)
    record = json.loads((layout.site_keys_file).read_text())
    assert sorted(record) == ["Alpha Clinic", "beta"] and len(superlink.keys) == 2
    beta_id = record["beta"]["node_id"]

    # A restart with the same folder changes nothing.
    site_keys.sync_site_keys(layout, check_credentials(credentials), said.append)
    assert len(superlink.keys) == 2 and not any(call[1] == "unregister" for call in superlink.calls)

    # beta's key is stolen: removed from the folder, then revoked at the coordinator.
    remove_site(credentials, "beta")
    site_keys.sync_site_keys(layout, check_credentials(credentials), said.append)
    assert beta_id not in superlink.keys and len(superlink.keys) == 1
    assert f'unregistered the node key of site "beta" (node id {beta_id})' in said[-2]
    assert "beta" not in json.loads((layout.site_keys_file).read_text())

    # Alpha's key is replaced: the old one is unregistered, the new one registered.
    alpha_id = record["Alpha Clinic"]["node_id"]
    add_site(credentials, "Alpha Clinic", force=True)
    site_keys.sync_site_keys(layout, check_credentials(credentials), said.append)
    assert alpha_id not in superlink.keys and len(superlink.keys) == 1
    assert any("its key file was replaced" in line for line in said)


def test_a_key_registered_before_node_ids_were_recorded_is_named_when_it_cannot_be_revoked(credentials, tmp_path, monkeypatch):
    from coordinator import site_keys

    superlink = _SuperLink()
    monkeypatch.setattr(site_keys, "run_flower_cli", superlink)
    for site in ("alpha-clinic", "beta"):
        superlink(None, ["supernode", "register", str(credentials / "sites" / f"{site}.pub"), "skin-fl"])
    layout = StateLayout(tmp_path / "state")
    layout.root.mkdir()
    said = []
    site_keys.sync_site_keys(layout, check_credentials(credentials), said.append)
    assert all("already registered" in line for line in said)
    remove_site(credentials, "beta")
    site_keys.sync_site_keys(layout, check_credentials(credentials), said.append)
    assert any(line.startswith('WARNING: the old node key of site "beta"') and "new --state-dir" in line for line in said)

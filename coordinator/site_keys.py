"""The SuperLink's registered node keys kept equal to the credentials folder: new keys registered, removed or replaced ones unregistered."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable

from coordinator.deployment import CONNECTION_NAME, Credentials, DeploymentError, StateLayout, flower_error, run_flower_cli
from shared.durable_files import write_json_atomically


def key_fingerprint(public_key_text: str) -> str:
    """SHA-256 of an OpenSSH public key's key bytes (its comment, the site name, left out)."""
    fields = public_key_text.strip().split()
    if len(fields) < 2:
        raise DeploymentError("a site's .pub file is not an OpenSSH public key; write it again with skin-fl-certs add-site")
    return hashlib.sha256(base64.b64decode(fields[1])).hexdigest()


def sync_site_keys(layout: StateLayout, credentials: Credentials, say: Callable[[str], None] = print) -> None:
    """Make the SuperLink accept exactly the node keys in the credentials folder.

    A site whose key file is gone (`skin-fl-certs remove-site`) or was replaced
    (`add-site --force`) has its old key unregistered, so a stolen or retired key stops working;
    then every key in the folder is registered. Node ids are recorded in the state folder's `site_keys.json`; a key
    registered before this record existed cannot be found by id, and is named in a warning.
    """
    record_path = layout.site_keys_file
    recorded: dict[str, dict] = json.loads(record_path.read_text(encoding="utf-8")) if record_path.is_file() else {}
    present = {site: key_fingerprint(path.read_text(encoding="utf-8")) for site, path in credentials.site_keys}
    for site, entry in sorted(recorded.items()):
        if present.get(site) == entry["key_sha256"]:
            continue
        why = "its key file was replaced" if site in present else "its key file is gone from the credentials folder"
        if entry.get("node_id") is None:
            say(f'WARNING: the old node key of site "{site}" ({why}) was registered before skin-fl recorded node ids '
                f"and stays accepted; start the coordinator with a new --state-dir to drop every old key")
        else:
            reply = run_flower_cli(layout, ["supernode", "unregister", str(entry["node_id"]), CONNECTION_NAME])
            if not reply.get("success") and "not found" not in flower_error(reply).lower():
                raise DeploymentError(
                    f"could not unregister the node key of site {site!r} (node id {entry['node_id']}): {flower_error(reply)}"
                )
            say(f'unregistered the node key of site "{site}" (node id {entry["node_id"]}): {why}')
        del recorded[site]
        write_json_atomically(record_path, recorded)
    for site, public_key in credentials.site_keys:
        reply = run_flower_cli(layout, ["supernode", "register", str(public_key), CONNECTION_NAME])
        if reply.get("success"):
            recorded[site] = {"node_id": int(reply["node-id"]), "key_sha256": present[site]}
            say(f'registered the node key of site "{site}" ({public_key.name}), node id {reply.get("node-id")}')
        elif "already in use" in flower_error(reply):
            recorded.setdefault(site, {"node_id": None, "key_sha256": present[site]})
            say(f'node key of site "{site}" ({public_key.name}) was already registered')
        else:
            raise DeploymentError(
                f"could not register the node key of site {site!r} ({public_key}): {flower_error(reply)}. "
                f"Check the file is the .pub written by skin-fl-certs."
            )
        write_json_atomically(record_path, recorded)

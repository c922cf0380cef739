"""End to end on loopback with real processes: nginx + SuperLink (TLS, node auth) + two SuperNodes, and the refusals."""

import csv
import http.client
import shutil
import ssl
import sys
import time

import pytest

from coordinator.certs import init_credentials, site_file_stem
from coordinator.deployment import CONNECTION_NAME, StateLayout, _alive, descendants, run_flower_cli, write_flower_cli_config
from deploy_harness import FAST_RUN_CONFIG, Deployment, free_port, read_json
from server.run_config_file import app_directory, write_run_config_file
from shared.models.classifier import load_classifier

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 420
"""A cap for a shared, loaded machine; on an idle 2-core machine the run takes about a minute."""
ONE_ROUND_RUN = {**FAST_RUN_CONFIG, "num-server-rounds": 1, "head-refit-steps": 1}
"""One round proves a run over TLS with node authentication completes at both sites (and the classification
layer's refit, in its shortest form, that the sites answer its queries from their own feature caches); two
rounds over the real deployment (and a resume between them) are the resilience test's."""
PROTOBUF = {"Content-Type": "application/protobuf"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    """The federation, a submitted 1-round run, and the two SuperNodes that must be refused, all started at once."""
    root = tmp_path_factory.mktemp("deployment")
    deployment = Deployment(root)
    try:
        deployment.make_credentials()
        deployment.make_site_data()
        deployment.start_server()
        for site in deployment.sites:
            deployment.start_supernode(site, ca=deployment.credentials / "ca.crt")
        deployment.run_id = deployment.submit(ONE_ROUND_RUN)
        # The refused SuperNodes run while the federation trains, so their checks cost no extra time.
        deployment.without_ca = deployment.start_supernode(
            deployment.sites[0], ca=None, log_name="supernode-without-ca.log", extra=("--max-retries", "1", "--max-wait-time", "15")
        )
        outsider = root / "outsider-credentials"
        init_credentials(outsider, ["localhost"], ["Gamma Hospital"], days=1)
        deployment.unregistered = deployment.start_supernode(
            deployment.sites[1], key=outsider / "sites" / "gamma-hospital.key", ca=deployment.credentials / "ca.crt",
            log_name="supernode-unregistered.log", extra=("--max-retries", "1", "--max-wait-time", "15"),
        )
        # A hospital whose skin-fl-client holds another federation's CA.
        alpha = deployment.sites[0]
        deployment.wrong_ca_client = deployment._spawn(
            [
                sys.executable, "-m", "client.cli", "--site", alpha.name,
                "--superlink", f"127.0.0.1:{deployment.public_port}", "--ca-cert", str(outsider / "ca.crt"),
                "--site-key", str(deployment.credentials / "sites" / "alpha-clinic.key"),
                "--data", str(alpha.data_dir), "--format", "folder", "--cache-dir", str(alpha.cache_dir),
                "--state-dir", str(root / "client-state-wrong-ca"), "--supernode-port", str(free_port()),
                "--max-restarts", "0",
            ],
            "client-wrong-ca.log",
        )
        yield deployment
    finally:
        started = [pid for process in deployment.processes for pid in (process.pid, *descendants(process.pid))]
        deployment.close()
        time.sleep(0.5)
        left = [pid for pid in started if _alive(pid)]
        assert not left, f"processes still running after teardown: {left}"


def test_two_site_run_over_tls_with_node_auth_finishes_with_per_site_metrics(deployment):
    status = deployment.wait_for_run(deployment.run_id, RUN_TIMEOUT_S)
    assert status == "finished:completed", deployment.log_tails()
    folder = deployment.run_folder(deployment.run_id)
    rounds = read_json(folder / "history.json")["rounds"]
    assert [entry["round"] for entry in rounds] == [1]
    for entry in rounds:
        assert entry["train_sites"] == ["Alpha Clinic", "beta"]
        assert entry["evaluate_sites"] == ["Alpha Clinic", "beta"]
        for site in ("Alpha Clinic", "beta"):
            assert entry["sites"][site]["train"]["num-examples"] > 0
            assert 0.0 <= entry["sites"][site]["evaluate"]["balanced-accuracy"] <= 1.0
    with (folder / "metrics_per_site.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted({row["site"] for row in rows}) == ["Alpha Clinic", "beta"]
    assert (folder / "final_model.pt").is_file()
    _, saved = load_classifier(folder / "final_model.pt")
    assert len(saved.metadata["head_refit"]["validation_balanced_accuracy"]) >= 2, "the sites answered the refit's queries"
    for site in deployment.sites:
        assert list((site.cache_dir / "_frozen-features").glob("*.pt")), f"{site.name} keeps its features for the next query"
    # The sites' data differ, so their local results differ.
    first = rounds[0]["sites"]
    assert first["Alpha Clinic"]["train"]["train-loss"] != first["beta"]["train"]["train-loss"]

    status_text = deployment.server_cli("status").stdout
    assert deployment.run_id in status_text and "finished:completed" in status_text and folder.name in status_text
    history_text = deployment.server_cli("history", deployment.run_id).stdout
    assert "Alpha Clinic, beta / Alpha Clinic, beta" in history_text
    assert len([line for line in history_text.splitlines() if line.strip()[:1].isdigit()]) == 1

    # Every Fleet call of the run went through nginx over TLS.
    access_log = (deployment.layout.nginx_dir / "logs" / "access.log").read_text()
    assert "POST /v1/fleet/pull-messages" in access_log and "POST /v1/fleet/push-messages" in access_log


def test_a_submitted_run_can_be_stopped(deployment):
    deployment.wait_for_run(deployment.run_id, RUN_TIMEOUT_S)
    run_id = deployment.submit({**FAST_RUN_CONFIG, "num-server-rounds": 50})
    stopped = deployment.server_cli("stop", run_id)
    assert stopped.returncode == 0 and f"run {run_id} stopped" in stopped.stdout, stopped.stderr
    assert deployment.wait_for_run(run_id, 60) == "finished:stopped"
    again = deployment.server_cli("stop", run_id)
    assert again.returncode == 2 and f"could not stop run {run_id}" in again.stderr


def test_a_run_whose_app_package_differs_from_the_sites_code_is_refused_at_every_site(deployment, tmp_path):
    # A coordinator whose app package holds one changed line of client code: the sites run none of it.
    deployment.wait_for_run(deployment.run_id, RUN_TIMEOUT_S)
    source, changed = app_directory(), tmp_path / "changed-app"
    changed.mkdir()
    shutil.copy(source / "pyproject.toml", changed / "pyproject.toml")
    for package in ("client", "shared", "server"):
        shutil.copytree(source / package, changed / package, ignore=shutil.ignore_patterns("__pycache__"))
    with (changed / "client" / "app.py").open("a") as handle:
        handle.write("\nprint('code the sites never checked')\n")
    config_file = write_run_config_file(tmp_path / "run-config.toml", {**FAST_RUN_CONFIG, "num-server-rounds": 1})
    reply = run_flower_cli(deployment.layout, ["run", str(changed), CONNECTION_NAME, "--run-config", str(config_file)], timeout=300)
    run_id = str(reply["run-id"])
    logs = [f"supernode-{site_file_stem(site.name)}.log" for site in deployment.sites]
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not all("site-app-package" in deployment.log(name) for name in logs) and time.monotonic() < deadline:
        time.sleep(1)
    deployment.server_cli("stop", run_id)
    for name in logs:
        log = deployment.log(name)
        assert "differs from the skin-fl code installed at this site in 1 file(s) (client/app.py)" in log, log[-3000:]
        assert "code the sites never checked" not in log
    assert not (deployment.run_folder(run_id) / "final_model.pt").exists()


def test_supernode_without_the_ca_cannot_connect(deployment):
    assert deployment.without_ca.wait(timeout=120) != 0
    log = deployment.log("supernode-without-ca.log")
    assert "CERTIFICATE_VERIFY_FAILED" in log, log[-3000:]


def test_site_client_with_the_wrong_ca_says_what_to_fix(deployment):
    assert deployment.wrong_ca_client.wait(timeout=120) != 0
    log = deployment.log("client-wrong-ca.log")
    assert "does not vouch for" in log and "ca.crt" in log, log[-3000:]


def test_supernode_with_an_unregistered_key_is_refused(deployment):
    assert deployment.unregistered.wait(timeout=120) != 0
    assert "Failed to activate SuperNode" in deployment.log("supernode-unregistered.log")
    superlink_log = (deployment.layout.logs_dir / "superlink.log").read_text()
    assert "No SuperNode found with the given public key" in superlink_log


def _request(port: int, path: str, ca_path, server_name: str = "127.0.0.1", method: str = "POST") -> int:
    context = ssl.create_default_context(cafile=str(ca_path))
    connection = http.client.HTTPSConnection(server_name, port, timeout=10, context=context)
    try:
        connection.request(method, path, body=b"", headers=PROTOBUF)
        return connection.getresponse().status
    finally:
        connection.close()


def test_public_port_refuses_the_control_and_runtime_apis(deployment):
    ca = deployment.credentials / "ca.crt"
    # The same request straight to the SuperLink's loopback port is served: the Control API has no login.
    assert _request(deployment.superlink_port, "/v1/control/list-runs", ca) == 200
    for path in (
        "/v1/control/list-runs",
        "/v1/control/start-run",
        "/v1/control/register-node",
        "/v1/control/stop-run",
        "/v1/runtime/acquire-task",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "//v1/control/list-runs",
        "/v1/fleet/get-run/../../control/list-runs",
        "/docs",
        "/health",
    ):
        assert _request(deployment.public_port, path, ca) == 403, path
    assert _request(deployment.public_port, "/v1/fleet/get-run", ca, method="GET") == 403

    # The real Flower CLI, holding the CA and pointed at the public port, can do none of it.
    outsider = StateLayout(deployment.root / "outsider-cli")
    write_flower_cli_config(outsider, deployment.public_port, ca)
    public_key = deployment.credentials / "sites" / "beta.pub"
    for arguments in (["list"], ["supernode", "register", str(public_key)], ["stop", deployment.run_id]):
        reply = run_flower_cli(outsider, arguments)
        assert reply.get("success") is False, (arguments, reply)
        assert "403" in str(reply) or "Forbidden" in str(reply), (arguments, reply)
    run_config = deployment.root / "outsider-run-config.toml"
    run_config.write_text("num-server-rounds = 1\n")
    reply = run_flower_cli(
        outsider, ["run", str(app_directory()), "skin-fl", "--run-config", str(run_config)], timeout=120
    )
    assert reply.get("success") is False, reply


def test_a_removed_site_key_is_unregistered_at_the_running_coordinator(deployment):
    # Last in this module: it revokes a site the tests above use.
    from coordinator.certs import main as certs_main

    record = read_json(deployment.layout.site_keys_file)
    beta_id = record["beta"]["node_id"]
    assert certs_main(["remove-site", "--out", str(deployment.credentials), "--site", "beta"]) == 0
    synced = deployment.server_cli("sync-site-keys", "--credentials", str(deployment.credentials))
    assert synced.returncode == 0, synced.stderr
    assert f'unregistered the node key of site "beta" (node id {beta_id})' in synced.stdout
    statuses = {int(node["node-id"]): node["status"] for node in run_flower_cli(deployment.layout, ["supernode", "list"])["nodes"]}
    assert statuses.get(beta_id, "unregistered") == "unregistered", statuses
    assert statuses[record["Alpha Clinic"]["node_id"]] != "unregistered"

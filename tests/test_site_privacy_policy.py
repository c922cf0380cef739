"""The site's own privacy policy: a run asking for more is refused at the site before any step, and a lost ledger is an error."""

import json

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.config import parse_config_args

from client.app import create_client_app
from client.privacy_round import open_site_ledger
from client.site_config import SiteSettings, node_config_toml
from client.site_source import NodeConfigSite
from server.privacy_budget import PrivacyBudget
from server.screened_grid import ScreenedGrid
from shared.config import RunConfig
from shared.privacy.accounting import PrivacyLedger, PrivacyLedgerError, RoundSchedule, epsilon_of
from shared.privacy.site_policy import PrivacyPolicyRefused, SitePrivacyPolicy
from shared.privacy.training import refuse_past_budget
from shared.protocol import LEDGER_KEY, PRIVATE_SITES_KEY, ScreenedSiteError
from site_loopback import LoopbackGrid, server_task_identity
from test_site_replies import PATIENT_FILE, _site_with_a_corrupt_patient_file, _train_message

LOCAL = {"mode": "local", "target_delta": 1e-3, "max_grad_norm": 1.0}


def _run(**privacy) -> RunConfig:
    return RunConfig(
        classes=["mel", "nv"], model={"name": "resnet18", "pretrained": "none"}, preprocess={"image_size": 32},
        train={"batch_size": 4, "balance": "none", "device": "cpu", "progress": False}, federation={"rounds": 1, "min_sites": 1},
        privacy=privacy or {"mode": "off"},
    )


def test_the_policy_refuses_what_the_site_does_not_accept():
    capped = SitePrivacyPolicy(max_epsilon=4.0)
    assert capped.refusal(_run(**LOCAL, target_epsilon=3.0)) is None
    assert "above the site's cap 4.0" in capped.refusal(_run(**LOCAL, target_epsilon=8.0))
    assert "no privacy.target_epsilon" in capped.refusal(_run(**LOCAL, noise_multiplier=1.0))
    assert "has no bound at the site" in capped.refusal(_run())
    only_private = SitePrivacyPolicy(required_mode="local")
    assert only_private.refusal(_run(**LOCAL, noise_multiplier=1.0)) is None
    with pytest.raises(PrivacyPolicyRefused, match="joins only runs with privacy.mode 'local'.*this run has 'off'"):
        only_private.check(_run())
    assert SitePrivacyPolicy().refusal(_run()) is None


def test_the_site_file_policy_reaches_the_clientapp_through_the_node_config(tmp_path):
    settings = SiteSettings.model_validate({
        "site": "clinic-a", "superlink": "localhost:9443", "data": {"dir": str(tmp_path)},
        "privacy": {"max-epsilon": 4.0, "lifetime-epsilon": 12.0, "required-mode": "local"},
    })
    path = tmp_path / "node-config.toml"
    path.write_text(node_config_toml(settings, "folder"))
    node_config = parse_config_args([str(path)])
    assert SitePrivacyPolicy.from_node_config(node_config) == SitePrivacyPolicy(
        max_epsilon=4.0, lifetime_epsilon=12.0, required_mode="local"
    )


@pytest.mark.parametrize("policy, run", [
    ({"privacy-max-epsilon": 4.0}, _run(**LOCAL, target_epsilon=8.0)),
    ({"privacy-required-mode": "local"}, _run()),
])
def test_a_run_asking_for_more_is_refused_before_any_step_with_a_code_the_coordinator_sees(tmp_path, policy, run):
    data = _site_with_a_corrupt_patient_file(tmp_path / "exports")
    cache = tmp_path / "cache"
    node_config = {"site": "clinic-a", "data-dir": str(data), "format": "folder", "cache-dir": str(cache), **policy}
    with server_task_identity():
        grid = ScreenedGrid(LoopbackGrid(create_client_app(NodeConfigSite()), {7: node_config}))
        (reply,) = grid.send_and_receive([_train_message(run)])
    assert ScreenedSiteError.of(reply.error.reason).code == "site-privacy-policy"
    assert "the run asks for more than the site's privacy policy allows" in reply.error.reason
    # Refused before any step: the site did not even read its images (the corrupt file would have failed that).
    assert not cache.exists()


def test_a_missing_ledger_of_a_run_the_coordinator_recorded_as_private_is_an_error_not_zero(tmp_path):
    run = _run(**LOCAL, noise_multiplier=1.0)
    budget = PrivacyBudget(run, tmp_path / "run")
    budget.sites = {"clinic-a": {"epsilon": 1.2, "epsilon_next_round": 1.8, "noise_multiplier": 1.0, "round": 1}}
    config = ConfigRecord()
    budget.before_train(2, ArrayRecord(), config)
    assert json.loads(config[PRIVATE_SITES_KEY]) == ["clinic-a"] and config[LEDGER_KEY] == "run"

    site = Context(run_id=1, node_id=7, node_config={"privacy-dir": str(tmp_path / "privacy")}, state=RecordDict(), run_config={})
    with server_task_identity():
        message = Message(RecordDict({"config": config}), dst_node_id=7, message_type="train")
    with pytest.raises(PrivacyLedgerError, match="missing, but the coordinator's records show site 'clinic-a' already trained"):
        open_site_ledger(NodeConfigSite(), site, message, "clinic-a", run)
    # A site the records do not list starts its ledger; once written, it is read back.
    ledger = open_site_ledger(NodeConfigSite(), site, message, "clinic-b", run)
    ledger.record(2, 1.0, 0.25, 3)
    assert PrivacyLedger.open(tmp_path / "privacy", "clinic-b", "run", 1e-3, must_exist=True).rounds == ledger.rounds


def test_the_lifetime_cap_composes_the_steps_of_every_run_the_site_recorded(tmp_path):
    run = _run(**LOCAL, noise_multiplier=1.0)
    schedule = RoundSchedule(sample_rate=0.25, steps=20, noise_multiplier=1.0, run_steps=20)
    PrivacyLedger.open(tmp_path, "clinic-a", "run-1", 1e-3).record(1, *schedule.entry())
    one_run, two_runs = epsilon_of([schedule.entry()], 1e-3), epsilon_of([schedule.entry()] * 2, 1e-3)

    capped = PrivacyLedger.open(tmp_path, "clinic-a", "run-2", 1e-3, lifetime_epsilon=(one_run + two_runs) / 2)
    assert capped.other_runs_history == [schedule.entry()] and capped.history == []
    with pytest.raises(PrivacyPolicyRefused, match=f"to {two_runs:.3f} .*past the site's lifetime cap"):
        refuse_past_budget(capped, schedule, run, "round 1")
    refuse_past_budget(PrivacyLedger.open(tmp_path, "clinic-a", "run-2", 1e-3, lifetime_epsilon=two_runs + 0.01), schedule, run, "round 1")
    # Without a lifetime cap each run counts alone, as before.
    refuse_past_budget(PrivacyLedger.open(tmp_path, "clinic-a", "run-2", 1e-3), schedule, run, "round 1")
    # Another run's ledger that cannot be read holds spent budget: an error, not zero.
    (tmp_path / "clinic-a" / "run-0.json").write_text("{")
    with pytest.raises(PrivacyLedgerError, match="run-0.json is unreadable"):
        PrivacyLedger.open(tmp_path, "clinic-a", "run-2", 1e-3, lifetime_epsilon=100.0)
    assert "has no bound at the site" in SitePrivacyPolicy(lifetime_epsilon=8.0).refusal(_run())
    assert SitePrivacyPolicy(lifetime_epsilon=8.0).refusal(run) is None


def test_a_site_whose_earlier_runs_spent_its_lifetime_cap_refuses_the_next_private_run_before_any_step(tmp_path):
    data = _site_with_a_corrupt_patient_file(tmp_path / "exports")
    (data / "mel" / PATIENT_FILE).unlink()
    privacy_dir = tmp_path / "privacy"
    PrivacyLedger.open(privacy_dir, "clinic-a", "an-earlier-run", 1e-3).record(1, 0.6, 1.0, 50)
    node_config = {
        "site": "clinic-a", "data-dir": str(data), "format": "folder", "cache-dir": str(tmp_path / "cache"),
        "privacy-dir": str(privacy_dir), **SitePrivacyPolicy(lifetime_epsilon=8.0).node_config(),
    }
    run = _run(**LOCAL, target_epsilon=4.0)
    with server_task_identity():
        grid = ScreenedGrid(LoopbackGrid(create_client_app(NodeConfigSite()), {7: node_config}))
        (reply,) = grid.send_and_receive([_train_message(run)])
    assert ScreenedSiteError.of(reply.error.reason).code == "site-privacy-policy"
    # Nothing of the new run was trained or recorded; the earlier run's ledger is as it was.
    assert sorted(path.name for path in (privacy_dir / "clinic-a").iterdir()) == ["an-earlier-run.json"]

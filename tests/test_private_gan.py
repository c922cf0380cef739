"""DP-SGD for the GAN: Opacus-ready spectral norm, exact per-sample gradients, private rounds, budget at the server."""

import copy
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as torch_spectral_norm

import shared.privacy.gan_training as gan_training
from server.privacy_budget import LEDGER_KEY, PrivacyBudget
from shared.config import RunConfig
from shared.gan.models import SAVED_FORMAT, SpectralNormalised, build_gan, load_gan, use_sigma_gradient
from shared.privacy.accounting import PrivacyBudgetExceeded, PrivacyLedger
from shared.privacy.gan_training import train_gan_privately
from shared.privacy.training import quiet_opacus
from test_gan import CLASSES, TINY, _images

PRIVATE_GAN = {"mode": "local", "target_epsilon": 3.0, "target_delta": 1e-3, "max_grad_norm": 1.0}


def _run(**privacy) -> RunConfig:
    return RunConfig(
        classes=CLASSES,
        train={"balance": "none"},
        federation={"rounds": 2},
        gan=TINY.model_copy(update={"rounds": 2, "local_steps": 6}),
        privacy={**PRIVATE_GAN, **privacy},
    )


@pytest.mark.parametrize("layer,inputs", [
    (nn.Conv2d(3, 5, 3, padding=1), torch.randn(2, 3, 8, 8)),
    (nn.Linear(6, 1), torch.randn(4, 6)),
    (nn.Embedding(7, 6), torch.tensor([1, 3, 3])),
])
def test_spectral_norm_computes_what_torch_spectral_norm_computes(layer, inputs):
    reference, ours = torch_spectral_norm(copy.deepcopy(layer)), SpectralNormalised(copy.deepcopy(layer))
    with torch.no_grad():
        ours.u.copy_(reference.parametrizations.weight[0]._u)
        ours.v.copy_(reference.parametrizations.weight[0]._v)
    for _ in range(3):
        expected, actual = reference(inputs), ours(inputs)
        expected.square().sum().backward()
        actual.square().sum().backward()
        assert torch.allclose(expected, actual, atol=1e-5)
        assert torch.allclose(reference.parametrizations.weight.original.grad, ours.layer.weight.grad, rtol=1e-4, atol=1e-4)


def test_a_version_1_checkpoint_with_torch_spectral_norms_still_loads(tmp_path):
    generator, discriminator = build_gan(TINY, len(CLASSES))
    discriminator.eval()
    old_style = copy.deepcopy(discriminator)
    for module in list(old_style.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SpectralNormalised):
                replacement = torch_spectral_norm(child.layer)
                with torch.no_grad():
                    replacement.parametrizations.weight[0]._u.copy_(child.u)
                    replacement.parametrizations.weight[0]._v.copy_(child.v)
                setattr(module, name, replacement)
    path = tmp_path / "round_001.pt"
    torch.save(
        {"format": SAVED_FORMAT, "version": 1, "classes": CLASSES, "image_size": 32, "latent_dim": TINY.latent_dim,
         "channels": TINY.channels, "generator": generator.state_dict(), "discriminator": old_style.state_dict(), "metadata": {}},
        path,
    )
    _, loaded, _ = load_gan(path)
    images, labels = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    assert torch.allclose(loaded(images, labels), discriminator(images, labels), atol=1e-5)


def test_opacus_per_sample_gradients_of_the_discriminator_match_one_backward_per_image():
    from opacus import GradSampleModule

    _, discriminator = build_gan(TINY, len(CLASSES))
    use_sigma_gradient(discriminator, False)
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    wrapped = GradSampleModule(copy.deepcopy(discriminator), batch_first=True, loss_reduction="sum")
    with quiet_opacus():
        wrapped(images, labels).sum().backward()
    for row in range(4):
        single = copy.deepcopy(discriminator)
        single(images[row : row + 1], labels[row : row + 1]).sum().backward()
        for (name, sampled), (_, reference) in zip(wrapped._module.named_parameters(), single.named_parameters()):
            assert torch.allclose(sampled.grad_sample[row], reference.grad, atol=1e-5), name
    wrapped._close()


def test_a_private_gan_round_draws_poisson_batches_with_fixed_uniform_fakes_and_records_its_steps(tmp_path, monkeypatch):
    run = _run()
    generator, discriminator = build_gan(run.gan, len(CLASSES))
    before = {name: value.clone() for name, value in discriminator.state_dict().items()}
    calls = []
    real_step = gan_training.adversarial_step

    def recording_step(generator, discriminator, optimizers, real, fake_labels, **options):
        calls.append((len(real[0]), [len(labels) for labels in fake_labels], real[1].tolist(), fake_labels[0].tolist()))
        return real_step(generator, discriminator, optimizers, real, fake_labels, **options)

    monkeypatch.setattr(gan_training, "adversarial_step", recording_step)
    # Every real image is class 0: a fake of another class shows the fakes' classes do not come from the real batch.
    images = _images(count=40, labels=[0] * 40)
    ledger = PrivacyLedger.open(tmp_path, "site a", "run", 1e-3)
    result = train_gan_privately(generator, discriminator, images, run=run, ledger=ledger, server_round=1, device=torch.device("cpu"), seed=0)

    assert result.steps == 6 and len(calls) == 6
    assert all(fakes == [run.gan.batch_size, run.gan.batch_size] for _, fakes, _, _ in calls)
    assert len({real_count for real_count, _, _, _ in calls}) > 1, "Poisson sampling varies the real batch size"
    assert any(label != 0 for _, _, _, fake in calls for label in fake)
    assert result.sample_rate == pytest.approx(1 / 10) and result.epsilon > 0 and result.epsilon < result.epsilon_next_round
    assert [entry["round"] for entry in ledger.rounds] == ["gan-1"] and ledger.history == [(result.noise_multiplier, 0.1, 6)]
    assert any(not torch.equal(before[name], value) for name, value in discriminator.state_dict().items())
    assert all(module.sigma_gradient for module in discriminator.modules() if isinstance(module, SpectralNormalised))
    assert not any(module._forward_hooks or module._backward_hooks for module in discriminator.modules())
    assert all(not hasattr(parameter, "grad_sample") or parameter.grad_sample is None for parameter in discriminator.parameters())


def test_a_gan_round_past_the_budget_is_refused_before_any_step(tmp_path):
    run = _run(noise_multiplier=0.3, target_epsilon=0.5)
    generator, discriminator = build_gan(run.gan, len(CLASSES))
    before = {name: value.clone() for name, value in discriminator.state_dict().items()}
    ledger = PrivacyLedger.open(tmp_path, "site a", "run", 1e-3)
    with pytest.raises(PrivacyBudgetExceeded, match="GAN round 1 would raise the spent epsilon"):
        train_gan_privately(generator, discriminator, _images(count=40), run=run, ledger=ledger, server_round=1, device=torch.device("cpu"), seed=0)
    assert ledger.history == [] and all(torch.equal(before[name], value) for name, value in discriminator.state_dict().items())


def _gan_reply(site: str, epsilon: float, next_gan: float, next_classifier: float) -> SimpleNamespace:
    metrics = {"epsilon": epsilon, "epsilon-next-round": next_gan, "epsilon-next-classifier-round": next_classifier, "noise-multiplier": 1.0}
    content = RecordDict({"metrics": MetricRecord(metrics), "site": ConfigRecord({"name": site})})
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=1), has_error=lambda: False)


def test_the_server_ends_the_gan_phase_before_the_budget_and_hands_the_spent_epsilon_to_the_classifier_rounds(tmp_path):
    run = _run(noise_multiplier=1.0, target_epsilon=2.0)
    budget = PrivacyBudget(run, tmp_path)
    config = ConfigRecord()
    assert budget.before_gan_round(1, config) is None and config[LEDGER_KEY] == tmp_path.name
    entry = budget.after_gan_round(1, [_gan_reply("a", 1.2, 2.3, 1.9), _gan_reply("b", 0.8, 1.5, 1.4)])
    assert entry["epsilon_max"] == 1.2 and set(entry["sites"]) == {"a", "b"}
    reason = budget.before_gan_round(2, ConfigRecord())
    assert "GAN round 2 would take site a from epsilon 1.200 to 2.300" in reason

    classifier_phase = PrivacyBudget(run, tmp_path)
    assert classifier_phase.epsilon_spent == 1.2 and classifier_phase.epsilon_next_round == 1.9
    assert classifier_phase.stopped is None and classifier_phase.gan_stopped["before_gan_round"] == 2
    classifier_phase.before_train(1, None, ConfigRecord())  # 1.9 fits the budget of 2.0: no stop

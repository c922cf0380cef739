"""The conditional GAN in plain PyTorch: shapes, training steps, checkpoints, selection, augmentation, sampling CLI."""

import numpy as np
import pytest
import torch
from PIL import Image

from client.gan_sample_cli import main as gan_sample_main
from shared.config import GanConfig, ModelConfig, RunConfig, run_config_from_flower
from shared.data.cache import CachedImages
from shared.errors import DataError, ModelError
from shared.gan.augmentation import (
    add_synthetic_to_training,
    require_real_evaluation_splits,
    synthesis_targets,
    synthesise_for_site,
)
from shared.gan.models import (
    build_gan,
    gan_checkpoint_path,
    gan_to_arrays,
    latest_gan_checkpoint,
    load_gan,
    load_gan_arrays,
    save_gan,
)
from shared.gan.quality import frechet_distance, save_class_grid
from shared.gan.selection import select_synthetic
from shared.gan.training import discriminator_step, generator_step, train_gan_locally
from shared.models.classifier import build_classifier

CLASSES = ["akiec", "bcc", "df"]
TINY = GanConfig(image_size=32, channels=8, latent_dim=16, local_steps=2, batch_size=4)


def _images(count=24, size=32, split="train", seed=0, labels=None) -> CachedImages:
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels if labels is not None else rng.integers(0, len(CLASSES), count), dtype=np.int64)
    return CachedImages(
        images=rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8),
        labels=labels,
        image_ids=[f"{split}-{index}" for index in range(len(labels))],
        splits=np.asarray([split] * len(labels)),
        classes=list(CLASSES),
        source="test images",
    )


@pytest.mark.parametrize("size", [32, 64])
def test_generator_and_discriminator_shapes_without_nans(size):
    generator, discriminator = build_gan(TINY.model_copy(update={"image_size": size}), len(CLASSES))
    labels = torch.tensor([0, 1, 2, 1])
    images = generator(torch.randn(4, TINY.latent_dim), labels)
    assert images.shape == (4, 3, size, size)
    assert torch.isfinite(images).all() and images.abs().max() <= 1
    scores = discriminator(images, labels)
    assert scores.shape == (4,) and torch.isfinite(scores).all()
    assert discriminator(images).shape == (4,)  # unconditional term only (precision probe)


def test_image_size_must_be_a_power_of_two_between_32_and_128():
    with pytest.raises(ValueError, match="32, 64, 128"):
        GanConfig(image_size=48)
    with pytest.raises(ValueError, match="needs GAN rounds"):
        GanConfig(only=True)
    with pytest.raises(ValueError, match="needs a generator"):
        GanConfig(augment=True)


def test_run_config_has_gan_phase_off_by_default_and_flower_keys():
    assert RunConfig().gan.rounds == 0 and not RunConfig().gan.active
    run = run_config_from_flower({"gan-rounds": 3, "gan-only": True, "gan-image-size": 32, "gan-generator": ""})
    assert (run.gan.rounds, run.gan.only, run.gan.image_size, run.gan.generator) == (3, True, 32, None)


def test_discriminator_step_updates_only_the_discriminator():
    generator, discriminator = build_gan(TINY, len(CLASSES))
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    before_d = {k: v.clone() for k, v in discriminator.state_dict().items()}
    before_g = {k: v.clone() for k, v in generator.named_parameters()}
    labels = torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        fakes = generator(torch.randn(4, TINY.latent_dim), labels)
    loss = discriminator_step(discriminator, optimizer, (torch.rand(4, 3, 32, 32) * 2 - 1, labels), (fakes, labels))
    assert np.isfinite(loss)
    assert any(not torch.equal(before_d[k], v) for k, v in discriminator.state_dict().items())
    assert all(torch.equal(before_g[k], v) for k, v in generator.named_parameters())


def test_generator_step_leaves_discriminator_weights_and_gradients_alone():
    generator, discriminator = build_gan(TINY, len(CLASSES))
    optimizer = torch.optim.Adam(generator.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in discriminator.named_parameters()}
    loss, images = generator_step(generator, discriminator, optimizer, torch.randn(4, TINY.latent_dim), torch.tensor([0, 1, 2, 0]))
    assert np.isfinite(loss) and images.shape == (4, 3, 32, 32)
    assert all(parameter.grad is None for parameter in discriminator.parameters())
    assert all(torch.equal(before[k], v) for k, v in discriminator.named_parameters())
    assert all(parameter.requires_grad for parameter in discriminator.parameters())


def test_local_training_runs_the_steps_with_finite_losses_on_larger_cached_images():
    generator, discriminator = build_gan(TINY, len(CLASSES))
    before = gan_to_arrays(generator, discriminator)
    result = train_gan_locally(generator, discriminator, _images(size=48), config=TINY, device=torch.device("cpu"), seed=1)
    assert result.steps == 2 and result.num_examples == 8
    assert np.isfinite(result.discriminator_loss) and np.isfinite(result.generator_loss)
    after = gan_to_arrays(generator, discriminator)
    assert set(after) == set(before)
    assert any(not np.array_equal(before[name], after[name]) for name in before)


def test_arrays_and_checkpoints_round_trip(tmp_path):
    generator, discriminator = build_gan(TINY, len(CLASSES))
    arrays = gan_to_arrays(generator, discriminator)
    assert any(name.startswith("generator.") for name in arrays) and any(name.startswith("discriminator.") for name in arrays)
    other_g, other_d = build_gan(TINY, len(CLASSES))
    load_gan_arrays(other_g, other_d, arrays)
    assert all(np.array_equal(value, gan_to_arrays(other_g, other_d)[name]) for name, value in arrays.items())
    assert latest_gan_checkpoint(tmp_path) is None
    for server_round in (1, 2, 10):
        save_gan(gan_checkpoint_path(tmp_path, server_round), generator, discriminator, CLASSES, {"round": server_round})
    server_round, path = latest_gan_checkpoint(tmp_path)
    assert server_round == 10 and path.name == "round_010.pt"
    loaded_g, _, saved = load_gan(path)
    assert saved.classes == CLASSES and saved.metadata["round"] == 10 and saved.gan_config(TINY) == TINY
    labels = torch.tensor([0, 2])
    latent = torch.randn(2, TINY.latent_dim)
    generator.eval()
    assert torch.allclose(generator(latent, labels), loaded_g(latent, labels))


def test_loading_a_file_that_is_not_a_gan_checkpoint_says_what_to_give(tmp_path):
    torch.save({"format": "skin-fl-classifier"}, tmp_path / "model.pt")
    with pytest.raises(ModelError, match="gan/checkpoints"):
        load_gan(tmp_path / "model.pt")


def _real_features(count=60, dims=16, seed=0):
    return np.random.default_rng(seed).normal(size=(count, dims))


def test_memorisation_guard_rejects_a_copy_of_a_training_image_and_keeps_a_novel_one():
    real = _real_features()
    novel = np.random.default_rng(99).normal(size=(1, 16))
    candidates = np.vstack([real[7], novel[0]])
    result = select_synthetic(np.array([0, 0]), np.array([1.0, 0.5]), candidates, real, realism_reject_fraction=0.0)
    assert result.rejected["memorised"] == 1 and result.rejected_per_class["memorised"] == {0: 1}
    assert result.kept.tolist() == [1]
    assert result.thresholds.memorisation > 0


def test_a_barely_perturbed_training_image_is_still_rejected():
    real = _real_features()
    nearly = real[3] + 1e-4 * np.random.default_rng(1).normal(size=16)
    result = select_synthetic(np.array([1]), np.array([0.0]), nearly[None], real, realism_reject_fraction=0.0)
    assert result.kept.size == 0 and result.rejected["memorised"] == 1


def test_near_duplicates_and_the_least_realistic_candidates_are_rejected():
    real = _real_features()
    novel = np.random.default_rng(5).normal(size=(3, 16))
    candidates = np.vstack([novel[0], novel[0] + 1e-6, novel[1], novel[2]])
    scores = np.array([3.0, 2.0, 1.0, -5.0])
    result = select_synthetic(np.zeros(4, dtype=int), scores, candidates, real, realism_reject_fraction=0.25)
    assert result.rejected == {"unrealistic": 1, "memorised": 0, "near_duplicate": 1}
    assert result.kept.tolist() == [0, 2]


def test_synthesis_targets_fill_up_to_the_median_or_a_ratio_and_skip_absent_classes():
    counts = np.array([100, 10, 0, 40, 60])
    assert synthesis_targets(counts, GanConfig()).tolist() == [0, 30, 0, 0, 0]
    assert synthesis_targets(counts, GanConfig(target="ratio", target_ratio=0.5)).tolist() == [0, 40, 0, 10, 0]
    assert synthesis_targets(counts, GanConfig(max_synthetic_per_class=5)).tolist() == [0, 5, 0, 0, 0]


def _site(train=12, val=4, test=5) -> CachedImages:
    parts = [_images(train, split="train", seed=1), _images(val, split="val", seed=2), _images(test, split="test", seed=3)]
    return CachedImages(
        images=np.concatenate([p.images for p in parts]),
        labels=np.concatenate([p.labels for p in parts]),
        image_ids=[i for p in parts for i in p.image_ids],
        splits=np.concatenate([p.splits for p in parts]),
        classes=list(CLASSES),
        source="site",
    )


def test_synthetic_images_join_the_training_split_and_never_a_test_split():
    site = _site()
    synthetic = _images(6, split="train", seed=4, labels=[2] * 6)
    synthetic.image_ids = [f"synthetic-df-{i:05d}" for i in range(6)]
    combined = add_synthetic_to_training(site, synthetic)
    assert len(combined.select("train")) == 18
    for split in ("val", "test"):
        assert combined.select(split).image_ids == site.select(split).image_ids
        assert np.array_equal(combined.select(split).images, site.select(split).images)
    assert sum(i.startswith("synthetic-") for i in combined.select("train").image_ids) == 6
    leaked = CachedImages(synthetic.images, synthetic.labels, synthetic.image_ids, np.asarray(["test"] * 6), list(CLASSES))
    with pytest.raises(DataError, match="only join the training split"):
        add_synthetic_to_training(site, leaked)
    with pytest.raises(DataError, match="in the test split"):
        require_real_evaluation_splits(leaked)


def test_site_synthesis_selects_and_returns_training_images_at_the_classifier_size():
    torch.manual_seed(0)
    generator, discriminator = build_gan(TINY, len(CLASSES))
    generator.eval()
    feature_model = build_classifier(ModelConfig(name="resnet10t", pretrained="none"), len(CLASSES))
    train = _images(labels=[0] * 20 + [1] * 10 + [2] * 2, size=40)
    synthesis = synthesise_for_site(generator, discriminator, feature_model, train, config=TINY, image_size=40, seed=0)
    assert synthesis.wanted.tolist() == [0, 0, 8]
    report = synthesis.report()
    assert report["candidates"] == 16 and report["rejected"]["unrealistic"] == 4
    assert set(synthesis.images.labels.tolist()) <= {2} and len(synthesis.images) <= 8
    assert synthesis.images.images.shape[1:] == (40, 40, 3)
    assert set(synthesis.images.splits.tolist()) <= {"train"}


def test_frechet_distance_is_zero_for_identical_sets_and_grows_with_a_shift():
    features = np.random.default_rng(0).normal(size=(200, 8))
    assert frechet_distance(features, features) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(features, features + 1.0) == pytest.approx(8.0, rel=0.05)


def test_class_grid_and_sampling_cli_write_images(tmp_path, capsys):
    generator, discriminator = build_gan(TINY, len(CLASSES))
    grid = save_class_grid(generator, CLASSES, tmp_path / "grid.png", per_class=4)
    assert Image.open(grid).size == (4 * 34 + 2, 3 * 34 + 2)
    checkpoint = save_gan(tmp_path / "round_001.pt", generator, discriminator, CLASSES, {"round": 1})
    assert gan_sample_main([str(checkpoint), "--class", "df", "--count", "5", "--output", str(tmp_path / "df")]) == 0
    assert len(list((tmp_path / "df").glob("synthetic-df-*.png"))) == 5
    assert gan_sample_main([str(checkpoint), "--class", "df", "--count", "3", "--grid", "--output", str(tmp_path / "g.png")]) == 0
    assert Image.open(tmp_path / "g.png").size[1] == 34 + 2
    assert gan_sample_main([str(checkpoint), "--class", "mel", "--output", str(tmp_path / "x")]) == 2
    assert "choose one of akiec, bcc, df" in capsys.readouterr().err


def test_synthetic_set_tag_ignores_where_the_generator_came_from(tmp_path):
    from client.gan_handlers import synthetic_set_tag

    generator, discriminator = build_gan(TINY, len(CLASSES))
    checkpoint = save_gan(tmp_path / "round_003.pt", generator, discriminator, CLASSES, {"round": 3})
    run = RunConfig(gan=GanConfig(rounds=5, augment=True))
    resumed = run.model_copy(update={"gan": run.gan.model_copy(update={"generator": str(checkpoint), "start_round": 4})})
    assert synthetic_set_tag(run) == synthetic_set_tag(resumed)
    assert synthetic_set_tag(run) != synthetic_set_tag(run.model_copy(update={"seed": 1}))

"""skin-fl-sim's differential-privacy options and how they become `PrivacyConfig`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shared.config import PrivacyConfig
from shared.run_folder import RunFolder


def add_privacy_options(parser: argparse.ArgumentParser) -> None:
    """The `privacy` argument group: mode, budget, noise, clipping, sampling and per-sample-gradient mode."""
    group = parser.add_argument_group("differential privacy")
    group.add_argument(
        "--privacy",
        choices=["off", "local", "central"],
        default="off",
        help="local: DP-SGD at every site with an epsilon budget; central: server-side clipping and noise (default off)",
    )
    group.add_argument("--target-epsilon", type=float, help="epsilon budget of the whole run (local)")
    group.add_argument("--target-delta", type=float, help="delta of the guarantee (local), e.g. 1e-5")
    group.add_argument("--noise-multiplier", type=float, help="fixed noise multiplier (local: instead of calibrating to --target-epsilon)")
    group.add_argument("--max-grad-norm", type=float, help="per-sample (local) or per-site-update (central) clipping norm")
    group.add_argument("--no-poisson-sampling", action="store_true", help="shuffled instead of Poisson-sampled batches (local)")
    group.add_argument(
        "--grad-sample-mode", choices=["auto", "hooks", "functorch", "ghost"], default="auto", help="Opacus per-sample-gradient mode"
    )
    group.add_argument(
        "--trainable-stages",
        type=int,
        help="local, recipe fine-tune: train only the last N feature stages and the head (0 = head only), the rest frozen "
        "pretrained (default: all; giving it picks the fine-tune recipe)",
    )
    group.add_argument(
        "--dp-recipe",
        choices=["linear-head", "fine-tune"],
        help="local: linear-head (default) trains the classification layer over cached frozen features; fine-tune trains "
        "the network (or --trainable-stages of it) on images",
    )
    group.add_argument("--head-steps-per-round", type=int, help="local, linear-head: DP-SGD steps of the head per round")
    group.add_argument("--head-batch-size", type=int, help="local, linear-head: expected Poisson batch (default: every image)")
    group.add_argument("--head-learning-rate", type=float, help="local, linear-head: SGD rate of the head")
    group.add_argument("--head-momentum", type=float, help="local, linear-head: SGD momentum of the head")


def privacy_config_from_args(args: argparse.Namespace) -> PrivacyConfig:
    """The validated privacy settings the command line describes (ValueError with the fix when inconsistent)."""
    head = {
        name: getattr(args, name)
        for name in ("head_steps_per_round", "head_batch_size", "head_learning_rate", "head_momentum")
        if getattr(args, name) is not None
    }
    return PrivacyConfig(
        mode=args.privacy,
        target_epsilon=args.target_epsilon,
        target_delta=args.target_delta,
        noise_multiplier=args.noise_multiplier,
        max_grad_norm=args.max_grad_norm,
        poisson_sampling=not args.no_poisson_sampling,
        grad_sample_mode=args.grad_sample_mode,
        trainable_stages=args.trainable_stages,
        recipe=args.dp_recipe,
        **head,
    )


def print_privacy_plan(run, training_sizes: dict[str, int]) -> None:
    """Before training: each site's noise multiplier, sampling rate, steps and epsilon, and a warning for the sites
    whose steps would be mostly noise even at best.

    The best case of a step's signal is every sampled image's clipped gradient pointing the same
    way (norm sampling rate x images x clipping norm); the noise norm is noise multiplier x
    clipping norm x sqrt(trained parameters). Over the run's classifier steps the signal adds up
    and the noise grows as the square root of the steps: when even that best ratio is below 1,
    the site's updates are mostly noise whatever its data. Each site also measures the step ratio on its
    own features before its steps (linear-head recipe) and warns in its log.
    """
    import math

    from shared.models.classifier import build_classifier
    from shared.privacy.accounting import RoundSchedule, epsilon_of, planned_phases
    from shared.privacy.head_training import MOSTLY_NOISE
    from shared.privacy.model_preparation import prepare_for_private_training

    if not run.privacy.local:
        return
    model = prepare_for_private_training(
        build_classifier(run.model.model_copy(update={"pretrained": "none"}), len(run.classes)), run.privacy.prepared_stages
    )
    trained = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    print(f"privacy plan (DP-SGD, {run.privacy.recipe}, {trained} trained parameters, delta {run.privacy.target_delta}), per site:")
    for site, size in sorted(training_sizes.items()):
        schedule = RoundSchedule.for_site(run, size)
        whole_run = epsilon_of([(schedule.noise_multiplier, rate, steps) for rate, steps in planned_phases(run, size)], run.privacy.target_delta)
        best = schedule.sample_rate * size / (schedule.noise_multiplier * math.sqrt(trained))
        print(f"  {site}: {size} training images, noise multiplier {schedule.noise_multiplier:.2f}, sampling rate "
              f"{schedule.sample_rate:.3f}, {schedule.steps} steps a round, epsilon {whole_run:.2f} over the run, "
              f"signal-to-noise of a step at most {best:.2f}")
        if best * math.sqrt(schedule.steps * run.federation.rounds) < MOSTLY_NOISE:
            print(f"  warning: {site}'s updates will be mostly noise at this epsilon (even perfectly aligned clipped "
                  "gradients summed over the run are smaller than their noise); raise the epsilon, train fewer "
                  "parameters, or pool its images with a larger site")


def print_privacy_outcome(run, run_folder: Path, summary: dict) -> None:
    """Print (and add to the summary) the epsilon the sites spent and why the run stopped early, if it did."""
    path = RunFolder(run_folder).privacy
    if run.privacy.mode == "off" or not path.exists():
        return
    privacy = json.loads(path.read_text())
    summary["privacy"] = {
        "mode": run.privacy.mode,
        "epsilon_spent_max": privacy["epsilon_spent_max"],
        "epsilon_budget": privacy["epsilon_budget"],
        "delta": privacy["delta"],
        "stopped_early": privacy["stopped_early"],
    }
    if run.privacy.local:
        budget = f" of budget {privacy['epsilon_budget']}" if privacy["epsilon_budget"] is not None else ""
        print(f"privacy (DP-SGD, {run.privacy.recipe}, delta {privacy['delta']}): epsilon spent {privacy['epsilon_spent_max']:.3f}{budget}")
        for site, entry in sorted(privacy["sites"].items()):
            sampling = f", sampling rate {entry['sample_rate']:.3f}, {entry['steps']} steps in its last round" if "steps" in entry else ""
            print(f"  {site}: epsilon {entry['epsilon']:.3f}, noise multiplier {entry['noise_multiplier']:.2f}{sampling}")
    else:
        print(f"privacy (central): noise multiplier {run.privacy.noise_multiplier}, clipping norm {run.privacy.max_grad_norm}")
    if privacy["stopped_early"]:
        print(f"stopped early: {privacy['stopped_early']['reason']}")

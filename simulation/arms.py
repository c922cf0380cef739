"""Training arms of skin-fl-bench, run in one process over prepared sites: pooled, local-only, federated, personalised.

A federated arm runs the same site training (`train_on_images`, the ClientApp's own call) and the
same server aggregation (`shared.aggregation`, the strategies' own arithmetic) as a Flower run,
sites one after another on one device, so a table of arms x seeds fits one machine, GPU or CPU.
Every arm is scored after every round on the pooled validation split (model selection) and on
the pooled, lesion-disjoint test split.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from shared.aggregation import ServerOptimiser, weighted_average
from shared.batch_norm import measure_batch_norm_statistics, merge_batch_norm_statistics
from shared.calibration import best_temperature, calibration_bins, summed_negative_log_likelihoods
from shared.config import RoundInstructions, RunConfig
from shared.data.cache import CachedImages, concatenate
from shared.head_refit import SummedAnswers, sum_answers
from shared.local_training import (
    epoch_samples,
    evaluate_on_images,
    logits_on_images,
    precision_for,
    seed_everything,
    site_round_seed,
    train_on_images,
)
from shared.metrics import classification_metrics
from shared.models.classifier import build_classifier
from shared.models.frozen_features import frozen_features
from shared.models.model_cut import cut_model
from shared.personalisation import personalise
from shared.prior_correction import PRIOR_STEPS, offset_step, soft_confusion
from shared.top_refit import refit_layers, site_refit_gradient
from shared.weights import load_arrays_into, model_to_arrays
from simulation.centralised import pooled_run

FEDERATED_ARMS = ("fedavg", "fedprox", "fedavgm", "fedadam")
ARMS = ("local", "pooled", *FEDERATED_ARMS, "personalised")
REPORTED_METRICS = ("balanced_accuracy", "accuracy", "macro_auc", "melanoma_sensitivity")


@dataclass
class ArmResult:
    """One arm x seed: per-round validation and test figures, the final and the validation-selected round."""

    arm: str
    seed: int
    wall_seconds: float
    rounds: list[dict] = field(default_factory=list)
    per_site: dict[str, dict] = field(default_factory=dict)
    per_site_global: dict[str, dict] = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    precisions: list[str] = field(default_factory=list)
    """The training precisions the cell used (amp 'auto' picks bf16 or fp32 by a timing, which changes figures)."""

    def final(self) -> dict:
        """Test figures of the last round's model."""
        return self.rounds[-1]["test"]

    def selected_round(self) -> int:
        """The round whose model has the best pooled validation balanced accuracy (the latest on ties), as a run selects it."""
        best = max(self.rounds, key=lambda entry: (entry["val_balanced_accuracy"], entry["round"]))
        return best["round"]

    def as_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "arm": self.arm,
            "seed": self.seed,
            "wall_seconds": self.wall_seconds,
            "rounds": self.rounds,
            "per_site": self.per_site,
            "per_site_global": self.per_site_global,
            "calibration": self.calibration,
            "precisions": self.precisions,
            "final": self.final(),
            "selected_round": self.selected_round(),
            "selected": self.rounds[self.selected_round() - 1]["test"],
        }


@dataclass
class ArmContext:
    """What every arm shares: settings, the sites' images, the device and a progress callback."""

    run: RunConfig
    sites: dict[str, CachedImages]
    device: torch.device
    log: Callable[[str], None] = print
    partial_path: Path | None = None
    """Where a federated or pooled arm keeps its state after every round, so an interrupted cell continues."""

    def __post_init__(self) -> None:
        self.pooled_val = concatenate([images.select("val") for images in self.sites.values()])
        self.pooled_test = concatenate([images.select("test") for images in self.sites.values()])
        self.precisions: set[str] = set()
        """Training precisions used so far (see ArmResult.precisions)."""
        self.federation_class_counts = [
            int(count) for count in sum(images.select("train").class_counts() for images in self.sites.values())
        ]

    def with_run(self, run: RunConfig) -> ArmContext:
        """The same context with other settings (the precisions used are counted together)."""
        derived = ArmContext(run, self.sites, self.device, self.log, self.partial_path)
        derived.precisions = self.precisions
        return derived

    def new_model(self) -> nn.Module:
        """The run's classifier at its initial (pretrained) weights, on the device."""
        return build_classifier(self.run.model, num_classes=len(self.run.classes)).to(self.device)

    def score(self, model: nn.Module, server_round: int) -> dict:
        """Pooled validation balanced accuracy and pooled test figures of `model` after `server_round`."""
        precision = precision_for(model, self.run.train, self.device, self.run.preprocess.image_size)
        batch = self.run.train.batch_size * 2
        val = evaluate_on_images(model, self.pooled_val, batch_size=batch, device=self.device, precision=precision)
        test = evaluate_on_images(model, self.pooled_test, batch_size=batch, device=self.device, precision=precision)
        return {
            "round": server_round,
            "val_balanced_accuracy": val["balanced_accuracy"],
            "test": {name: test[name] for name in REPORTED_METRICS},
            "test_recall": {name: item["recall"] for name, item in test["per_class"].items()},
        }

    def calibration(self, model: nn.Module) -> dict:
        """The handed-on model's post-hoc steps as a run takes them, each fitted on the pooled validation split.

        Temperature and class-prior offsets of the model as trained (test figures before and after),
        and, with `federation.head_refit_steps`, the same after the classification layer's refit
        (`head_refit`: whether the refitted layer was kept, validation and test balanced accuracy at every query, the
        refitted model's test figures and those after its own temperature and prior correction:
        what the run hands on).
        """
        figures = self._temperature_and_prior(model)
        if self.run.head_refit_steps():
            refitted, refit = self._head_refitted(model)
            after = self._temperature_and_prior(refitted)
            figures["head_refit"] = {
                **refit,
                "prior_offsets": after["prior_offsets"],
                "prior_corrected": after["prior_corrected"],
            }
        return figures

    def _temperature_and_prior(self, model: nn.Module) -> dict:
        """Temperature and class-prior offsets fitted on the pooled validation split; test figures before and after."""
        precision = precision_for(model, self.run.train, self.device, self.run.preprocess.image_size)
        batch = self.run.train.batch_size * 2
        val_logits, val_labels = logits_on_images(model, self.pooled_val, batch_size=batch, device=self.device, precision=precision)
        temperature = best_temperature(summed_negative_log_likelihoods(val_logits, val_labels))
        test_logits, test_labels = logits_on_images(model, self.pooled_test, batch_size=batch, device=self.device, precision=precision)
        before = calibration_bins(test_logits.softmax(dim=1).numpy(), test_labels.numpy())
        after = calibration_bins((test_logits / temperature).softmax(dim=1).numpy(), test_labels.numpy())
        by_steps, offsets = [], np.zeros(len(self.run.classes))
        for _ in range(PRIOR_STEPS):
            offsets = offset_step(soft_confusion(val_logits / temperature, val_labels, offsets), offsets)
            corrected_logits = test_logits / temperature + torch.as_tensor(offsets, dtype=torch.float32)
            corrected = classification_metrics(test_labels.numpy(), corrected_logits.softmax(dim=1).numpy(), self.run.classes)
            by_steps.append({name: corrected[name] for name in REPORTED_METRICS})
        return {
            "temperature": temperature,
            "test_ece": before["expected_calibration_error"],
            "test_ece_calibrated": after["expected_calibration_error"],
            "prior_offsets": [float(value) for value in offsets],
            "prior_corrected": by_steps[-1],
            "prior_corrected_by_steps": by_steps,
        }

    def _head_refitted(self, model: nn.Module) -> tuple[nn.Module, dict]:
        """A copy of `model` with its top (`federation.refit_layers`) refitted as a run's sites and server refit it, and the refit's figures.

        The sum of the sites' gradients is computed site by site (shared.top_refit.site_refit_gradient,
        the sites' own call); test figures of every step are recorded beside the validation ones.
        """
        layers = self.run.federation.refit_layers
        precision = precision_for(model, self.run.train, self.device, self.run.preprocess.image_size)
        refitted = copy.deepcopy(model)
        cut = cut_model(refitted, layers)
        test_activations = frozen_features(model, self.pooled_test, device=self.device, precision=precision, cut=cut_model(model, layers))
        test_labels = np.asarray(self.pooled_test.labels)
        test_by_query = []
        splits = [(images.select("train"), images.select("val")) for images in self.sites.values()]
        site_gradient = site_refit_gradient(layers)
        base = model_to_arrays(model)

        def sums_at(values: dict[str, np.ndarray]) -> SummedAnswers:
            load_arrays_into(refitted, {**base, **values})
            answers = [
                site_gradient(refitted, train, val, self.federation_class_counts, device=self.device, precision=precision)
                for train, val in splits
            ]
            refitted.eval()
            with torch.no_grad():
                logits = torch.cat([cut.top(chunk.to(self.device)).float().cpu() for chunk in test_activations.split(1024)])
            test = classification_metrics(test_labels, logits.softmax(dim=1).numpy(), self.run.classes)
            test_by_query.append(test["balanced_accuracy"])
            return sum_answers(answers, cut.trained_names, len(self.run.classes))

        result = refit_layers(layers, model, base, sums_at, steps=self.run.head_refit_steps())
        load_arrays_into(refitted, {**base, **result.layers})
        refitted_test = evaluate_on_images(
            refitted, self.pooled_test, batch_size=self.run.train.batch_size * 2, device=self.device, precision=precision
        )
        return refitted, {
            "refitted": result.refitted,
            "layers": layers,
            "val_balanced_accuracy_by_query": result.validation_balanced_accuracy,
            "test_balanced_accuracy_by_query": test_by_query,
            "refitted_test": {name: refitted_test[name] for name in REPORTED_METRICS},
        }

    def per_site_test(self, model: nn.Module, only: str | None = None) -> dict[str, dict]:
        """Test figures of `model` on every site's own test split (or on site `only`'s)."""
        precision = precision_for(model, self.run.train, self.device, self.run.preprocess.image_size)
        figures = {}
        for site, images in self.sites.items():
            if only is not None and site != only:
                continue
            test = evaluate_on_images(
                model, images.select("test"), batch_size=self.run.train.batch_size * 2, device=self.device, precision=precision
            )
            figures[site] = {name: test[name] for name in REPORTED_METRICS}
        return figures

    def recalibrated(self, model: nn.Module, global_arrays: dict) -> dict:
        """The global arrays with BatchNorm statistics measured at every site and merged (see shared.batch_norm)."""
        load_arrays_into(model, global_arrays)
        precision = precision_for(model, self.run.train, self.device, self.run.preprocess.image_size)
        measured, counts = [], []
        for images in self.sites.values():
            train = images.select("train")
            measured.append(
                measure_batch_norm_statistics(
                    model, train, batch_size=self.run.train.batch_size * 2, device=self.device, precision=precision
                )
            )
            counts.append(len(train))
        return {**global_arrays, **merge_batch_norm_statistics(measured, counts)}

    def train_site(self, model: nn.Module, images: CachedImages, server_round: int, site: str, global_arrays=None):
        """One site's local training of one round, exactly as the ClientApp runs it."""
        instructions = RoundInstructions.for_round(self.run, server_round, self.federation_class_counts)
        precision = precision_for(model, self.run.train, self.device, self.run.preprocess.image_size)
        self.precisions.add(precision.name)
        return train_on_images(
            model,
            images,
            config=self.run.train,
            device=self.device,
            precision=precision,
            learning_rate_start=instructions.learning_rate_start,
            learning_rate_end=instructions.learning_rate_end,
            seed=site_round_seed(self.run.seed, server_round, site),
            global_arrays=global_arrays,
            federation_class_counts=instructions.federation_class_counts,
            description=f"{site} round {server_round}",
        )


def run_federated(context: ArmContext, arm: str) -> ArmResult:
    """FedAvg, FedProx, FedAvgM or FedAdam over every site, every round."""
    return _federate(context, arm)[0]


def _federate(context: ArmContext, arm: str) -> tuple[ArmResult, nn.Module]:
    """A federated arm's result and its final global model."""
    run = context.run
    federation = run.federation
    if arm == "fedprox":
        run = run.model_copy(
            update={
                "train": run.train.model_copy(update={"proximal_mu": federation.proximal_mu}),
                "federation": federation.model_copy(update={"strategy": "fedprox"}),
            }
        )
        context = context.with_run(run)
    server = ServerOptimiser.for_strategy(
        arm, server_learning_rate=federation.server_learning_rate, server_momentum=federation.server_momentum
    )
    seed_everything(run.seed)
    model = context.new_model()
    global_arrays = model_to_arrays(model)
    result = ArmResult(arm, run.seed, 0.0)
    done = _resume(context, result, server)
    if done:
        global_arrays = done
    started = time.monotonic() - result.wall_seconds
    for server_round in range(len(result.rounds) + 1, federation.rounds + 1):
        updates, weights = [], []
        for site, images in context.sites.items():
            load_arrays_into(model, global_arrays)
            train = images.select("train")
            proximal = (
                {name: torch.as_tensor(value).to(context.device) for name, value in global_arrays.items()}
                if run.train.proximal_mu > 0
                else None
            )
            context.train_site(model, train, server_round, site, global_arrays=proximal)
            updates.append(model_to_arrays(model))
            weights.append(epoch_samples(train, run.train, context.federation_class_counts))
        global_arrays = server.step(global_arrays, weighted_average(updates, weights))
        if federation.batch_norm == "recalibrate":
            global_arrays = context.recalibrated(model, global_arrays)
        load_arrays_into(model, global_arrays)
        result.rounds.append(context.score(model, server_round))
        result.wall_seconds = time.monotonic() - started
        _keep_partial(context, result, global_arrays, server)
        context.log(_progress_line(arm, run.seed, result.rounds[-1], federation.rounds, time.monotonic() - started))
    load_arrays_into(model, global_arrays)
    result.wall_seconds = time.monotonic() - started
    result.per_site = context.per_site_test(model)
    result.calibration = context.calibration(model)
    return result, model


def run_personalised(context: ArmContext) -> ArmResult:
    """FedAvg, then every site fine-tunes the final global model on its own training split.

    Rounds and calibration are the global model's; `per_site` holds each site's personalised model
    on that site's own test split, `per_site_global` the global model on the same split.
    """
    result, model = _federate(context, "fedavg")
    result.arm = "personalised"
    result.per_site_global = result.per_site
    started = time.monotonic()
    result.per_site = {}
    for site, images in context.sites.items():
        seed = site_round_seed(context.run.seed, context.run.federation.rounds + 1, site)
        tuned = personalise(model, images.select("train"), context.run, device=context.device, seed=seed)
        result.per_site[site] = context.per_site_test(tuned, only=site)[site]
        global_figure = result.per_site_global[site]["balanced_accuracy"]
        context.log(
            f"[personalised seed {context.run.seed}] {site}: bal. acc {result.per_site[site]['balanced_accuracy']:.3f} "
            f"(global model {global_figure:.3f})"
        )
    result.wall_seconds += time.monotonic() - started
    return result


def run_pooled(context: ArmContext) -> ArmResult:
    """One model on the union of the sites' training splits, the same epochs and schedule as the federation."""
    run = pooled_run(context.run, len(context.sites))
    context = context.with_run(run)
    seed_everything(run.seed)
    model = context.new_model()
    pooled_train = concatenate([images.select("train") for images in context.sites.values()])
    result = ArmResult("pooled", run.seed, 0.0)
    done = _resume(context, result)
    if done:
        load_arrays_into(model, done)
    started = time.monotonic() - result.wall_seconds
    for server_round in range(len(result.rounds) + 1, run.federation.rounds + 1):
        context.train_site(model, pooled_train, server_round, "pooled")
        result.rounds.append(context.score(model, server_round))
        result.wall_seconds = time.monotonic() - started
        _keep_partial(context, result, model_to_arrays(model))
        context.log(_progress_line("pooled", run.seed, result.rounds[-1], run.federation.rounds, time.monotonic() - started))
    result.wall_seconds = time.monotonic() - started
    result.per_site = context.per_site_test(model)
    result.calibration = context.calibration(model)
    return result


def run_local(context: ArmContext) -> ArmResult:
    """Every site trains alone for the whole budget.

    Rounds hold the mean over the sites' models on the pooled splits; `per_site` holds each site's
    model on its own test split (what a hospital training alone would see).
    """
    run = context.run
    if run.train.balance == "global":
        # A site training alone knows only its own classes.
        run = run.model_copy(update={"train": run.train.model_copy(update={"balance": "sampler"})})
        context = context.with_run(run)
    per_site_rounds: dict[str, list[dict]] = {}
    own_test: dict[str, dict] = {}
    started = time.monotonic()
    for site, images in context.sites.items():
        seed_everything(run.seed)
        model = context.new_model()
        train = images.select("train")
        per_site_rounds[site] = []
        for server_round in range(1, run.federation.rounds + 1):
            context.train_site(model, train, server_round, site)
            per_site_rounds[site].append(context.score(model, server_round))
        own_test[site] = context.per_site_test(model, only=site)[site]
        context.log(_progress_line(f"local {site}", run.seed, per_site_rounds[site][-1], run.federation.rounds, time.monotonic() - started))
    result = ArmResult("local", run.seed, time.monotonic() - started)
    for index in range(run.federation.rounds):
        entries = [rounds[index] for rounds in per_site_rounds.values()]
        result.rounds.append(
            {
                "round": index + 1,
                "val_balanced_accuracy": _mean([entry["val_balanced_accuracy"] for entry in entries]),
                "test": {name: _mean([entry["test"][name] for entry in entries]) for name in REPORTED_METRICS},
            }
        )
    result.per_site = own_test
    return result


def run_arm(context: ArmContext, arm: str) -> ArmResult:
    """Run one named arm (see ARMS), with the training precisions it used."""
    if arm == "pooled":
        result = run_pooled(context)
    elif arm == "local":
        result = run_local(context)
    elif arm in FEDERATED_ARMS:
        result = run_federated(context, arm)
    elif arm == "personalised":
        result = run_personalised(context)
    else:
        raise ValueError(f"unknown arm {arm!r}; choose from {', '.join(ARMS)}")
    result.precisions = sorted(context.precisions)
    return result


def _keep_partial(context: ArmContext, result: ArmResult, arrays: dict, server: ServerOptimiser | None = None) -> None:
    """Save the arm's state after a round (weights, server optimiser, figures so far, random generators)."""
    if context.partial_path is None:
        return
    state = {
        "arrays": {name: torch.as_tensor(value) for name, value in arrays.items()},
        "server": {name: torch.as_tensor(value) for name, value in server.state().items()} if server is not None else {},
        "rounds": result.rounds,
        "wall_seconds": result.wall_seconds,
        "torch_rng": torch.get_rng_state(),
        "numpy_rng": _numpy_rng_state(),
    }
    temporary = context.partial_path.with_suffix(".tmp")
    torch.save(state, temporary)
    temporary.replace(context.partial_path)


def _numpy_rng_state() -> list:
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]


def _resume(context: ArmContext, result: ArmResult, server: ServerOptimiser | None = None) -> dict | None:
    """The global arrays of the last finished round of an interrupted cell (its figures go into `result`), or None."""
    if context.partial_path is None or not context.partial_path.is_file():
        return None
    state = torch.load(context.partial_path, weights_only=True)
    result.rounds = state["rounds"]
    result.wall_seconds = state["wall_seconds"]
    if server is not None:
        server.load_state({name: value.numpy() for name, value in state["server"].items()})
    torch.set_rng_state(state["torch_rng"])
    kind, keys, position, has_gauss, cached = state["numpy_rng"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    context.log(f"[{result.arm} seed {result.seed}] continuing after round {len(result.rounds)} ({context.partial_path.name})")
    return {name: value.numpy() for name, value in state["arrays"].items()}


def _mean(values: list) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _progress_line(arm: str, seed: int, entry: dict, rounds: int, seconds: float) -> str:
    test = entry["test"]
    return (
        f"[{arm} seed {seed}] round {entry['round']}/{rounds}: val bal. acc {entry['val_balanced_accuracy']:.3f}, "
        f"test bal. acc {test['balanced_accuracy']:.3f}, AUC {test['macro_auc'] or float('nan'):.3f}, "
        f"mel sens {test['melanoma_sensitivity'] or float('nan'):.3f} ({seconds:.0f} s)"
    )

"""What every classifier message hands a site: the round's instructions, the site's data and the global model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Context, Message
from torch import nn

from client.gan_handlers import site_training_images
from shared.config import RoundInstructions, RunConfig
from shared.data.cache import CachedImages, concatenate
from shared.device import resolve_device
from shared.models.classifier import build_classifier
from shared.privacy.model_preparation import prepare_for_private_training
from shared.protocol import INSTRUCTIONS_KEY
from shared.weights import load_arrays_into


@dataclass
class ReceivedRound:
    """A message's instructions and run settings, the site it reached, the device, and the global model on it."""

    instructions: RoundInstructions
    run: RunConfig
    site: object
    device: torch.device
    model: nn.Module
    arrays: dict[str, np.ndarray]

    def unpack(self) -> tuple:
        """(instructions, run, site, device, model, arrays)."""
        return self.instructions, self.run, self.site, self.device, self.model, self.arrays


def receive(message: Message, context: Context, source) -> ReceivedRound:
    """Read a classifier message: validated instructions, the site's images, and the global model built and loaded."""
    instructions = RoundInstructions.from_coordinator(message.content["config"][INSTRUCTIONS_KEY])
    run = instructions.run
    site = source.load(context, run)
    device = resolve_device(run.train.device)
    model = build_classifier(run.model, num_classes=len(run.classes))
    if run.privacy.mode != "off":
        prepare_for_private_training(model, run.privacy.prepared_stages)
    arrays = {name: array.numpy() for name, array in message.content["arrays"].items()}
    load_arrays_into(model, arrays)
    return ReceivedRound(instructions, run, site, device, model.to(device), arrays)


def round_training_images(received: ReceivedRound, source, context: Context) -> tuple[CachedImages, int]:
    """The images a site trains on this round (training split, synthetic and clinician cases) and the case count."""
    return training_images_of(received.site, received.run, source, context)


def training_images_of(site, run: RunConfig, source, context: Context) -> tuple[CachedImages, int]:
    """The images `site` trains on under `run` (training split, synthetic and clinician cases) and the case count."""
    images = site_training_images(source, context, site, run)
    feedback_examples = site.feedback.used if site.feedback is not None else 0
    if site.feedback is not None and site.feedback.images is not None:
        images = concatenate([images, site.feedback.images])
    return images, feedback_examples

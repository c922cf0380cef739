"""What one ClientApp message costs a fresh site process in imports: modules loaded and seconds, per message type.

A SuperNode starts a new ClientApp process for every message, so everything `client.app` and
the handler import is paid again on every message at every site. Run it on a demo site (or a
real one) to see that cost and which heavy libraries a message type pulls in:

    python -m simulation.message_imports --data DIR --format ham10000 --cache-dir DIR --message train

It prints one JSON object: the import's seconds and modules, then each message's handler
seconds and the heavy packages loaded by then. The test suite runs it to keep Opacus, scikit-learn, matplotlib and
the other heavy libraries off the plain classifier rounds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

MESSAGE_TYPES = ("train", "evaluate", "query.calibrate", "query.prior", "query.head_gradient", "query.batch_norm")

HEAVY_MODULES = (
    "opacus",
    "sklearn",
    "scipy",
    "matplotlib",
    "onnx",
    "onnxruntime",
    "fastapi",
    "uvicorn",
    "shared.gan",
    "shared.explain",
    "shared.export",
    "client.report",
    "client.web",
    "server",
)
"""Packages a plain classifier round (no DP, no GAN, no report, no web app) must not import.

OpenCV and torchvision are not listed: the training augmentation and normalisation run on
OpenCV, and timm imports torchvision (`timm.layers` needs `torchvision.ops`) before any model.
"""


def heavy_modules_loaded(modules=None) -> list[str]:
    """The HEAVY_MODULES packages present in `modules` (default: this process's sys.modules)."""
    names = sys.modules if modules is None else modules
    return sorted(package for package in HEAVY_MODULES if package in names)


def _tiny_run(classes: list[str], model: str):
    from shared.config import FederationConfig, ModelConfig, PreprocessConfig, RunConfig, TrainConfig

    return RunConfig(
        classes=classes,
        model=ModelConfig(name=model, pretrained="none"),
        preprocess=PreprocessConfig(image_size=32),
        train=TrainConfig(batch_size=8, max_steps_per_epoch=1, amp="off", device="cpu", progress=False),
        federation=FederationConfig(rounds=1, min_sites=1),
    )


def _message(message_type: str, content):
    """`content` as the SuperNode delivers it: addressed to this node, with an id a reply can refer to."""
    from flwr.app import Message, Metadata

    metadata = Metadata(
        run_id=1, message_id=f"probe-{message_type}", src_node_id=0, dst_node_id=1, reply_to_message_id="", group_id="1",
        created_at=time.time(), ttl=3600.0, message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


def probe(message_types: list[str], *, data: str, format: str, cache_dir: str, model: str) -> dict:
    """Import the ClientApp, then handle each message type in turn on the site; what each step loaded and took."""
    before = set(sys.modules)
    started = time.perf_counter()
    from client.app import create_client_app

    import_seconds = time.perf_counter() - started
    after_import = set(sys.modules)

    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, RecordDict

    from shared.config import RoundInstructions
    from shared.data.readers import read_dataset
    from shared.models.classifier import build_classifier
    from shared.protocol import INSTRUCTIONS_KEY
    from shared.weights import model_to_arrays

    classes = read_dataset(Path(data), format).classes
    instructions = RoundInstructions.for_round(_tiny_run(classes, model), 1)
    global_model = build_classifier(instructions.run.model, num_classes=len(classes))
    arrays = {name: Array(value) for name, value in model_to_arrays(global_model).items()}
    context = Context(
        run_id=1, node_id=1, node_config={"site": "probe-site", "data-dir": data, "format": format, "cache-dir": cache_dir},
        state=RecordDict(), run_config={},
    )
    app = create_client_app()
    messages = []
    for message_type in message_types:
        content = RecordDict({"arrays": ArrayRecord(arrays), "config": ConfigRecord({INSTRUCTIONS_KEY: instructions.model_dump_json()})})
        handler_started = time.perf_counter()
        reply = app(_message(message_type, content), context)
        handler_seconds = time.perf_counter() - handler_started
        if reply.has_error():
            raise RuntimeError(f"the {message_type} handler failed: {reply.error.reason}")
        messages.append(
            {"message_type": message_type, "handler_seconds": round(handler_seconds, 3), "heavy_after": heavy_modules_loaded()}
        )
    return {
        "import_seconds": round(import_seconds, 3),
        "modules_on_import": len(after_import - before),
        "heavy_on_import": heavy_modules_loaded(after_import),
        "messages": messages,
    }


def main(argv: list[str] | None = None) -> int:
    """CLI: probe one message type in this (fresh) process and print the figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m simulation.message_imports", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the site's dataset folder")
    parser.add_argument("--format", default="ham10000", help="its format (default ham10000)")
    parser.add_argument("--cache-dir", required=True, help="the site's image cache folder")
    parser.add_argument(
        "--message", choices=MESSAGE_TYPES, nargs="+", default=["train"],
        help="message types to handle in turn, after one import (default train; one per process gives each its own cold start)",
    )
    parser.add_argument("--model", default="tf_efficientnet_lite0", help="timm model of the run (default tf_efficientnet_lite0)")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.message, data=args.data, format=args.format, cache_dir=args.cache_dir, model=args.model)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Latency and throughput of the real skin-fl-web server: one image with Grad-CAM overlay, and batches of 20."""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _demo_jpegs(count: int, width: int, height: int) -> list[bytes]:
    from shared.data.demo import render_lesion

    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    images = []
    for index in range(count):
        buffer = io.BytesIO()
        render_lesion(classes[index % len(classes)], np.random.default_rng(index), width=width, height=height).save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def _folder_jpegs(folder: Path, count: int) -> list[bytes]:
    files = sorted(path for path in Path(folder).rglob("*") if path.suffix.lower() in (".jpg", ".jpeg", ".png"))[:count]
    if len(files) < count:
        raise SystemExit(f"--images {folder} holds {len(files)} JPEG/PNG files, {count} are needed")
    return [path.read_bytes() for path in files]


def _default_model(folder: Path, image_size: int) -> Path:
    """The project's default architecture with its packaged ImageNet weights: the cost of a real global model."""
    import shared  # noqa: F401
    from shared.config import DEFAULT_MODEL, ModelConfig, PreprocessConfig
    from shared.models.classifier import build_classifier, save_classifier

    classes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    model = build_classifier(ModelConfig(name=DEFAULT_MODEL, pretrained="default"), num_classes=len(classes))
    return save_classifier(folder / "final_model.pt", model.eval(), model_name=DEFAULT_MODEL, classes=classes,
                           preprocess=PreprocessConfig(image_size=image_size))


def _start_server(model: Path, data_dir: Path, threads: int) -> tuple[subprocess.Popen, str, str]:
    import httpx

    from client.web.users import UserList

    token = UserList(data_dir / "users.json").add("benchmark")
    port = _free_port()
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(
        [sys.executable, "-m", "client.web_cli", "serve", "--data-dir", str(data_dir), "--model", str(model),
         "--port", str(port), "--threads", str(threads)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"{url}/api/health", timeout=1).status_code == 200:
                return process, url, token
        except httpx.HTTPError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise SystemExit(f"skin-fl-web did not start: {process.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.3)


def measure(model: Path, images: list[bytes], *, threads: int, single_requests: int, batch_size: int, batch_requests: int) -> dict:
    """Time single-image and batch requests against a freshly started server; returns the figures."""
    import httpx

    with tempfile.TemporaryDirectory(prefix="skin-fl-web-latency-") as folder:
        process, url, token = _start_server(model, Path(folder) / "web", threads)
        try:
            client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600)

            def post(batch: list[bytes]) -> float:
                files = [("files", (f"{index}.jpg", data, "image/jpeg")) for index, data in enumerate(batch)]
                started = time.perf_counter()
                response = client.post("/api/classify", files=files)
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                results = response.json()["results"]
                if len(results) != len(batch) or not all(result["overlay_jpeg_base64"] for result in results):
                    raise RuntimeError("the server answered without an overlay per image")
                return elapsed

            for index in range(3):  # warm-up: first requests pay for lazy initialisation
                post([images[index % len(images)]])
            single = [post([images[index % len(images)]]) for index in range(single_requests)]
            post(images[:batch_size])
            batches = [post(images[:batch_size]) for _ in range(batch_requests)]
            info = client.get("/api/model").json()
        finally:
            process.terminate()
            process.wait(timeout=30)
    single_ms = np.asarray(single) * 1000
    return {
        "model": info["version"],
        "image_size": info["image_size"],
        "threads": threads,
        "single_image": {
            "requests": single_requests,
            "p50_ms": float(np.percentile(single_ms, 50)),
            "p95_ms": float(np.percentile(single_ms, 95)),
            "mean_ms": float(single_ms.mean()),
        },
        "batch": {
            "images_per_request": batch_size,
            "requests": batch_requests,
            "median_seconds": float(np.median(batches)),
            "images_per_second": float(batch_size / np.median(batches)),
        },
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point: python -m simulation.web_latency [--model PATH] [--images DIR]."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, help="saved model to serve (default: the default architecture at --image-size)")
    parser.add_argument("--image-size", type=int, default=128, help="input size of the default model (default 128, the CPU default)")
    parser.add_argument("--images", type=Path, help="folder of JPEG/PNG test images (default: generated 600x450 demo lesions)")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of the server (default 2)")
    parser.add_argument("--single-requests", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--batch-requests", type=int, default=3)
    parser.add_argument("--output", type=Path, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    images = _folder_jpegs(args.images, args.batch_size) if args.images else _demo_jpegs(args.batch_size, 600, 450)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="skin-fl-web-model-") as folder:
        model = args.model or _default_model(Path(folder), args.image_size)
        figures = measure(model, images, threads=args.threads, single_requests=args.single_requests,
                          batch_size=args.batch_size, batch_requests=args.batch_requests)
    figures["load_average_before"] = [round(value, 2) for value in load_before]
    figures["load_average_after"] = [round(value, 2) for value in os.getloadavg()]
    figures["cpu_count"] = os.cpu_count()
    figures["images"] = str(args.images) if args.images else "generated 600x450 JPEG demo lesions"
    single, batch = figures["single_image"], figures["batch"]
    print(f"model {figures['model']} at {figures['image_size']} px, server on {args.threads} CPU threads, images: {figures['images']}")
    print(f"one image + Grad-CAM overlay: p50 {single['p50_ms']:.0f} ms, p95 {single['p95_ms']:.0f} ms ({single['requests']} requests)")
    print(f"batch of {batch['images_per_request']}: {batch['median_seconds']:.2f} s per request, {batch['images_per_second']:.1f} images/s")
    print(f"load average before {figures['load_average_before']}, after {figures['load_average_after']} ({figures['cpu_count']} CPUs)")
    if args.output:
        args.output.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

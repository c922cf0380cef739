"""Read back TensorBoard event files (TFRecord framing, Event protos) for the tests: tag -> {step: value}."""

import struct
from pathlib import Path

from tensorboardX.proto import event_pb2


def read_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the event files under `folder`."""
    scalars: dict[str, dict[int, float]] = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            record = data[offset + 12: offset + 12 + length]  # 8-byte length, 4-byte CRC, data, 4-byte CRC
            offset += 12 + length + 4
            event = event_pb2.Event.FromString(record)
            for value in event.summary.value:
                scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars

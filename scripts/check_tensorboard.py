#!/usr/bin/env python3
"""Manual check: TensorBoard itself reads forger's event files.

Not part of the test suite (CI has no TensorBoard). In a throwaway venv outside the repo:

    python3 -m venv /tmp/tbvenv && /tmp/tbvenv/bin/pip install tensorboard
    cargo run --release -p forger-coordinator --example tensorboard_log -- /tmp/forger-tb
    /tmp/tbvenv/bin/python scripts/check_tensorboard.py /tmp/forger-tb

Prints what TensorBoard's EventAccumulator loaded and exits 1 unless it is what the example
wrote (100 steps of loss_d and loss_g, a 40x40 PNG every 25 steps).
"""
import math
import sys

from tensorboard.backend.event_processing import event_accumulator as ea

acc = ea.EventAccumulator(sys.argv[1], size_guidance={ea.SCALARS: 0, ea.IMAGES: 0})
acc.Reload()
tags = acc.Tags()
print("tags:", {kind: tags[kind] for kind in ("scalars", "images")})
problems = []
for tag, formula in [("loss_d", lambda s: 0.3 + 1.1 * 0.98**s), ("loss_g", lambda s: 3.0 - 2.0 * 0.98**s)]:
    events = acc.Scalars(tag)
    print(f"{tag}: {len(events)} events, first {events[0]}, last {events[-1]}")
    if [e.step for e in events] != list(range(1, 101)):
        problems.append(f"{tag}: steps {[e.step for e in events]}")
    worst = max(abs(e.value - formula(e.step)) for e in events)
    print(f"{tag}: largest difference from the formula {worst:.2e}")
    if worst > 1e-6:
        problems.append(f"{tag}: off by {worst}")
images = acc.Images("samples")
for image in images:
    print(f"samples: step {image.step} {image.width}x{image.height}, {len(image.encoded_image_string)} bytes,",
          "png" if image.encoded_image_string.startswith(b"\x89PNG") else "NOT png")
if [(i.step, i.width, i.height) for i in images] != [(s, 40, 40) for s in (25, 50, 75, 100)]:
    problems.append("samples: wrong images")
if not all(math.isfinite(e.wall_time) and e.wall_time > 1.6e9 for e in acc.Scalars("loss_d")):
    problems.append("wall times")
print("problems:", problems or "none")
sys.exit(1 if problems else 0)

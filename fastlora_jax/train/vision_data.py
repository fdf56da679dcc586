"""Training rows of a vision-language model: each conversational image example through the
vision collator (`fastlora_jax/vision/collator.py`: chat template, processor, response mask),
then train/data.py's padded rows, plus the examples' pixel arrays beside them."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fastlora_jax.errors import DataError
from fastlora_jax.train.data import DataStats, build_rows
from fastlora_jax.vision.collator import VisionCollator


def build_vision_rows(collator: VisionCollator, dataset: Any, *, max_seq_length: int,
                      pad_token_id: int, name: str = "train_dataset",
                      host_inputs: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
                      | None = None) -> tuple[dict[str, np.ndarray], DataStats]:
    """Padded rows [N, max_seq_length] (input_ids, targets, positions, segment_ids) plus the
    processor's image arrays per row ("pixel_values" [N, images per row, C, H, W]; Qwen2.5-VL
    [N, patches, K] and "image_grid_thw" [N, images, 3]) and what the architecture's
    `host_inputs` derives from them. An example whose labels all fall beyond max_seq_length is
    dropped (counted); one whose image placeholders would be cut is an error."""
    examples, pixels = [], []
    total = 0
    for index, row in enumerate(dataset):
        total += 1
        where = f"{name}, example {index}"
        ids, mask, pv = collator.example(row, where)
        if len(ids) > max_seq_length and collator.image_token_id in ids[max_seq_length:]:
            raise DataError(f"{where}: {len(ids)} tokens; max_seq_length={max_seq_length} would "
                            f"cut its image placeholders; raise max_seq_length")
        if not any(mask[1:max_seq_length]):  # no trained token survives truncation
            continue
        examples.append((ids, mask))
        pixels.append(pv)
    shapes = sorted({() if p is None else tuple((k, v.shape) for k, v in sorted(p.items()))
                     for p in pixels})
    if len(shapes) > 1:
        raise DataError(f"{name}: examples' images give arrays of different shapes "
                        f"{[dict(s) for s in shapes[:3]]}; every example of a vision dataset "
                        f"must hold the same number of images (and, for an architecture with "
                        f"dynamic resolution such as Qwen2.5-VL, images of one size): a "
                        f"batch's pixel arrays have one shape")
    if not examples:
        raise DataError(f"every label is masked: no example of {name} has a trained token after "
                        f"templating and truncation to max_seq_length={max_seq_length}")
    rows, stats = build_rows(examples, max_seq_length=max_seq_length, packing=False,
                             pad_token_id=pad_token_id, name=name)
    stats.examples = total
    stats.dropped_no_labels = total - len(examples)
    if shapes != [()]:
        for key in pixels[0]:
            rows[key] = np.stack([p[key] for p in pixels])
        rows["pixel_values"] = rows["pixel_values"].astype(np.float32)
        if host_inputs is not None:
            rows.update(host_inputs({k: v for k, v in rows.items() if k != "positions"}))
    return rows, stats

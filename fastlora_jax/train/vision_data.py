"""Training rows of a vision-language model: each conversational image example through the
vision collator (`fastlora_jax/vision/collator.py`: chat template, processor, response mask),
then train/data.py's padded rows, plus the examples' image arrays beside them, one per row.

Examples hold different numbers of images (0, 1, 2, ...) and, for an architecture with dynamic
resolution (Qwen2.5-VL), images of different sizes, so their arrays differ along their first
axis (images, or patch rows). Each row's arrays are zero-padded along it to the dataset's most,
so a batch has one shape; the forward (`vision/forward.py`, rows=True) scatters each row's
image features into that row only and never reads the padding. Arrays that differ in any other
axis (a processor that gives images of different pixel sizes where the model needs one) cannot
share a batch and are an error.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from fastlora_jax.errors import DataError
from fastlora_jax.train.data import DataStats, build_rows
from fastlora_jax.vision.collator import VisionCollator


def pad_image_arrays(pixels: list[dict[str, np.ndarray] | None], indexes: list[int],
                     name: str) -> dict[str, np.ndarray]:
    """The rows' image arrays stacked [rows, most along axis 0, ...], each row's zero-padded
    along axis 0; a row without images (None) gets all padding. {} when no row has images.
    `indexes` are the rows' example numbers in `name`, for the error."""
    present = [(i, p) for i, p in zip(indexes, pixels) if p is not None]
    if not present:
        return {}
    first_index, first = present[0]
    for index, p in present:
        if sorted(p) != sorted(first):
            raise DataError(f"{name}, example {index}: the processor gave the arrays "
                            f"{sorted(p)} but {sorted(first)} for example {first_index}; "
                            f"every example's images must go through the same processor")
        for key, value in p.items():
            if value.shape[1:] != first[key].shape[1:]:
                raise DataError(
                    f"{name}, example {index}: its images give {key!r} of shape "
                    f"{value.shape}, but example {first_index}'s give {first[key].shape}; "
                    f"examples may differ only in the first axis (how many images or patch "
                    f"rows), so configure the processor to resize every image to one size "
                    f"(e.g. do_center_crop / a fixed 'size')")
    out = {}
    for key, value in first.items():
        longest = max(len(p[key]) for _, p in present)
        stacked = np.zeros((len(pixels), longest) + value.shape[1:], value.dtype)
        for row, p in enumerate(pixels):
            if p is not None:
                stacked[row, :len(p[key])] = p[key]
        out[key] = stacked
    return out


def build_vision_rows(collator: VisionCollator, dataset: Any, *, max_seq_length: int,
                      pad_token_id: int, name: str = "train_dataset",
                      host_inputs: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
                      | None = None) -> tuple[dict[str, np.ndarray], DataStats]:
    """Padded rows [N, max_seq_length] (input_ids, targets, positions, segment_ids) plus the
    processor's image arrays per row, padded along their first axis (see the module's
    docstring: "pixel_values" [N, most images per row, C, H, W]; Qwen2.5-VL [N, most patch rows,
    K] and "image_grid_thw" [N, most images per row, 3], all-zero grids for padding) and what
    the architecture's `host_inputs` derives from them. A dataset without any image has no image
    arrays. An example whose labels all fall beyond max_seq_length is dropped (counted); one
    whose image placeholders would be cut is an error."""
    examples, pixels, indexes = [], [], []
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
        indexes.append(index)
    if not examples:
        raise DataError(f"every label is masked: no example of {name} has a trained token after "
                        f"templating and truncation to max_seq_length={max_seq_length}")
    images = pad_image_arrays(pixels, indexes, name)
    rows, stats = build_rows(examples, max_seq_length=max_seq_length, packing=False,
                             pad_token_id=pad_token_id, name=name)
    stats.examples = total
    stats.dropped_no_labels = total - len(examples)
    if images:
        rows.update(images)
        rows["pixel_values"] = rows["pixel_values"].astype(np.float32)
        if host_inputs is not None:
            rows.update(host_inputs({k: v for k, v in rows.items() if k != "positions"}))
    return rows, stats

"""Actor outputs concatenate in real Ray whichever rows of a block failed.

Ray Data turns a numpy object column into an Arrow tensor column when every value is an array of one shape, and into
pickled Python objects when one value is ``None``; a later stage that merges two such blocks then fails with "Failed
to unify schemas: Found columns with both objects and tensors" and takes the job down. This once escaped the
pipeline tests because it needs an all-good block and a block with a failed row to meet in one batch, which depends on
scheduling. Here the two blocks are built on purpose.
"""

from __future__ import annotations

import numpy as np
import pytest

from clipmaps.actors.actor import ActorConfig, MethodActor
from clipmaps.actors.params import ModelSpec
from clipmaps.actors.predictors import OutputOptions, Vocabulary
from clipmaps.actors.registry import REGISTRY
from clipmaps.jobs.synth.scenes import make_scene
from clipmaps.pipeline.decode.preprocess import Preprocess
from clipmaps.schemas import batches as cols

PRE = Preprocess(size=64)
VOCAB = Vocabulary(names=("cat", "dog"), background=("sky",))


def _objects(values):
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr


def _block(first: int, failed: list[bool]) -> dict:
    """Rows as the decode stage emits them: failed rows carry empty arrays and an ``error_stage``."""
    scenes = [make_scene(first + i) for i in range(len(failed))]
    return {
        cols.IMAGE_ID: np.array([f"img{first + i}" for i in range(len(failed))]),
        cols.HEIGHT: np.array([240] * len(failed)),
        cols.WIDTH: np.array([320] * len(failed)),
        cols.ERROR_STAGE: _objects(["decode" if f else None for f in failed]),
        cols.PIXELS_SQUARE: _objects(
            [np.zeros((3, 0, 0), np.float32) if f else PRE.image(s.image) for s, f in zip(scenes, failed)]
        ),
        cols.MASKS_SQUARE: _objects(
            [
                np.zeros((0, 64, 64), np.float32) if f else np.stack([PRE.mask(m, (320, 240)) for m in s.masks[:1]])
                for s, f in zip(scenes, failed)
            ]
        ),
    }


class _Actor(MethodActor):
    def __init__(self, method: str, options: dict):
        entry = REGISTRY[method]
        super().__init__(
            ActorConfig(
                method=method,
                model=ModelSpec(name="clipmaps-tiny-vit", seed=0),
                settings=entry.settings(size=64, **options),
                templates="photo" if entry.encodes_text else None,
                vocabulary=VOCAB,
                options=OutputOptions(prompt_source="vocabulary" if entry.settings().heatmaps else None),
                drop_columns=(cols.PIXELS_SQUARE, cols.MASKS_SQUARE),
            )
        )


@pytest.mark.parametrize(
    "method, options",
    [
        ("gem", {"original": True}),
        ("legrad", {}),
        ("maskinversion", {}),
    ],
)
@pytest.mark.parametrize(
    "blocks",
    [
        [[False, False], [True, False]],  # a clean block meets one with a failed row
        [[False, False], [True, True]],  # ... or one where every row failed (the method never ran on it)
    ],
)
def test_blocks_with_and_without_failed_rows_merge(ray_local, method, options, blocks):
    import ray

    parts, first = [], 0
    for failed in blocks:
        parts.append(
            ray.data.from_items(
                [{k: v[i] for k, v in _block(first, failed).items()} for i in range(len(failed))]
            ).repartition(1)
        )
        first += len(failed)
    ds = parts[0].union(*parts[1:])
    out = ds.map_batches(
        _Actor,
        fn_constructor_args=(method, options),
        batch_size=2,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=1),
        num_cpus=0.5,
    )
    # a second stage that batches across both actor outputs forces Ray to unify their schemas
    merged = out.map_batches(lambda b: b, batch_size=4, batch_format="numpy", num_cpus=0.5)
    rows = merged.take_all()
    assert len(rows) == sum(map(len, blocks))
    errors = {r[cols.IMAGE_ID]: r[cols.ERROR_STAGE] for r in rows}
    assert sum(isinstance(v, str) for v in errors.values()) == sum(map(sum, blocks))


def test_decoded_blocks_with_and_without_failures_concatenate(ray_local, tmp_path):
    """The decode stage's side of the same guard: all-good, mixed and all-failed blocks of decoded rows (conformed
    to ``schemas.batches.COLUMNS``) concatenate in Ray Data."""
    from clipmaps.pipeline.decode import DecodeConfig, DecodeStage
    from clipmaps.pipeline.decode.preprocess import default_preprocess
    from clipmaps.pipeline.sources import iter_table_batches, manifest_from_rows
    from clipmaps.schemas.encodings import rle_encode
    from tests.helpers.data_images import marked_rgb, save

    good = save(marked_rgb(30, 20), tmp_path / "g.png")
    m = np.zeros((20, 30), bool)
    m[2:5, 3:9] = True
    uris = [good, good, good, str(tmp_path / "x.png"), str(tmp_path / "y.png"), str(tmp_path / "z.png")]
    rows = [
        {"image_id": str(i), "image_uri": u, "masks": [{"region_id": "0", "rle": rle_encode(m)}] if i == 0 else None}
        for i, u in enumerate(uris)
    ]
    config = DecodeConfig(square_size=32, maskclip=default_preprocess("maskclip"), need_masks=True)
    ds = ray_local.data.from_arrow(iter_table_batches(manifest_from_rows(rows), 2)).map_batches(
        DecodeStage, fn_constructor_kwargs={"config": config}, batch_format="numpy", batch_size=2, concurrency=1
    )

    def summary(b):
        return {
            "id": b[cols.IMAGE_ID],
            "failed": cols.failed_rows(b),
            "px": np.array([str(x.shape) for x in b[cols.PIXELS_SQUARE]]),
            "masks": np.array([len(x) if cols.present(x) else 0 for x in b[cols.MASK_IDS]]),
        }

    out = sorted(ds.map_batches(summary, batch_size=6, batch_format="numpy").take_all(), key=lambda r: r["id"])
    assert [r["failed"] for r in out] == [False] * 3 + [True] * 3
    assert [r["px"] for r in out] == [str((3, 32, 32))] * 3 + ["(3, 0, 0)"] * 3
    assert [r["masks"] for r in out] == [1, 0, 0, 0, 0, 0]

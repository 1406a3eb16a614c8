"""Results do not depend on batching: an image's outputs are a function of that image (and its own prompts) only.

A resumed run re-batches rows differently from a clean run, and an actor's text cache holds whatever earlier batches
left in it; both must leave every output bit for bit the same. Here the same eight images go through each method's
predictor in batches of 1, 3 and 8 and in a shuffled order, each time with a fresh actor (an empty text cache filled in
a different order), and through the pure-torch method modules; and a name's text embedding is compared encoded alone,
with other names and after other names filled the cache. CPU, fp32, the tiny seeded models.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipmaps.actors.actor import ActorConfig, MethodActor
from clipmaps.actors.methods.gem import GEM
from clipmaps.actors.methods.legrad import LeGrad
from clipmaps.actors.methods.maskclip import MaskCLIP
from clipmaps.actors.methods.maskinversion import MaskInversion
from clipmaps.actors.params import GEMParams, LeGradParams, MaskCLIPParams, MaskInversionParams, ModelSpec
from clipmaps.actors.predictors import OutputOptions, Vocabulary
from clipmaps.actors.registry import REGISTRY
from clipmaps.actors.text import TextEncoder
from clipmaps.jobs.synth.scenes import CLASSES, make_scene
from clipmaps.pipeline.decode.preprocess import Preprocess
from clipmaps.schemas import batches as cols

N = 8
PRE = Preprocess(size=64)
PRE_MASKCLIP = Preprocess(size=64, mode="short_side")
# each row's own prompts (None: the vocabulary's names), overlapping so the text cache is shared between rows
PROMPTS = [
    ["red circle", "blue square"],
    None,
    ["green triangle"],
    ["red circle", "yellow circle", "a dog"],
    None,
    ["orange square", "blue square", "green triangle"],
    ["purple triangle"],
    ["a dog", "red circle"],
]
VOCABULARY = Vocabulary(names=CLASSES[:6], background=("background",))
# orders and batch sizes: one row at a time, in threes, all at once, shuffled in threes and all at once
RUNS = [("in order", list(range(N)), 1), ("in order", list(range(N)), 3), ("in order", list(range(N)), 8)]
SHUFFLED = [int(i) for i in np.random.default_rng(7).permutation(N)]
RUNS += [("shuffled", SHUFFLED, 3), ("shuffled", SHUFFLED, 8)]


@pytest.fixture(scope="module")
def rows():
    scenes = [make_scene(i, size=(96, 72)) for i in range(N)]
    return {
        cols.IMAGE_ID: [f"img{i}" for i in range(N)],
        cols.HEIGHT: [72] * N,
        cols.WIDTH: [96] * N,
        cols.PIXELS_SQUARE: [PRE.image(s.image) for s in scenes],
        cols.PIXELS_MASKCLIP: [PRE_MASKCLIP.image(s.image) for s in scenes],
        cols.MASKS_SQUARE: [np.stack([PRE.mask(m, (96, 72)) for m in s.masks]) for s in scenes],
        cols.PROMPTS: PROMPTS,
    }


def _predictor(method, **settings):
    entry = REGISTRY[method]
    options = OutputOptions(
        write_expl_maps=method == "maskinversion", prompt_source="auto" if entry.settings().heatmaps else None
    )
    config = ActorConfig(
        method=method,
        model=ModelSpec(name="clipmaps-tiny-vit", seed=0),
        settings=entry.settings(size=64, **settings),
        templates="photo" if entry.encodes_text else None,
        vocabulary=VOCABULARY,
        options=options,
    )
    return MethodActor(config).predictor  # a fresh actor: an empty text cache


def _run(method, rows, order, batch_size, **settings) -> dict[str, list]:
    """Every output column per row (in the rows' own order) after running ``order`` in batches of ``batch_size``."""
    predictor = _predictor(method, **settings)
    out: dict[str, list] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        result = predictor.run({k: [v[i] for i in idx] for k, v in rows.items()})
        for name, values in result.columns.items():
            column = out.setdefault(name, [None] * len(order))
            for i, value in zip(idx, values):
                column[i] = value
    return out


def _bits(value):
    """A value as comparable bytes: PNG bytes as they are, arrays by dtype, shape and raw bytes, lists elementwise."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, np.ndarray):
        return (str(value.dtype), value.shape, value.tobytes())
    if isinstance(value, (list, tuple)):
        return [_bits(v) for v in value]
    return value


@pytest.mark.parametrize(
    "method, settings",
    [("gem", {"original": True}), ("maskclip", {}), ("legrad", {}), ("maskinversion", {"iterations": 5})],
)
def test_predictor_outputs_do_not_depend_on_batching(rows, method, settings):
    reference = _run(method, rows, *RUNS[0][1:], **settings)
    assert reference and all(all(v is not None for v in column) for column in reference.values())
    for label, order, batch_size in RUNS[1:]:
        out = _run(method, rows, order, batch_size, **settings)
        assert set(out) == set(reference)
        for name in reference:
            for i in range(N):
                assert _bits(out[name][i]) == _bits(reference[name][i]), (
                    f"{method}: {name} of row {i} differs {label} in batches of {batch_size} from one row at a time"
                )


# ------------------------------------------------------------------ the pure-torch method modules, raw float outputs


def _images(rows):
    return torch.from_numpy(np.stack(rows[cols.PIXELS_SQUARE]))


def _per_image(fn, n, order, batch_size):
    """``fn(idx)`` returns one tensor per index; → the outputs per image, run in batches of ``batch_size``."""
    out = [None] * n
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        for i, value in zip(idx, fn(idx)):
            out[i] = value
    return out


def _assert_same_bits(method, runs):
    """``runs``: ``((label, batch_size), outputs per image)``, the first one the reference."""
    reference = runs[0][1]
    for (label, batch_size), out in runs[1:]:
        for i, (a, b) in enumerate(zip(reference, out)):
            assert torch.equal(a, b), (
                f"{method}: image {i} differs {label} in batches of {batch_size} "
                f"(max abs {float((a - b).abs().max()):.3g})"
            )


def test_method_modules_are_batch_invariant(tiny_vit, rows):
    x = _images(rows)
    names = list(VOCABULARY.scored)
    prompts = [p or list(VOCABULARY.names) for p in PROMPTS]
    masks = [torch.from_numpy(m) for m in rows[cols.MASKS_SQUARE]]

    def fresh(cls, params, **kw):  # a fresh text cache per run
        return cls(
            tiny_vit.model, tiny_vit.tokenizer, params, text_encoder=TextEncoder(tiny_vit.model, tiny_vit.tokenizer)
        )

    cases = {
        "gem": lambda: (g := fresh(GEM, GEMParams()), lambda idx: list(g.class_logits(x[idx], names)))[1],
        "gem heatmaps": lambda: (
            g := fresh(GEM, GEMParams()),
            lambda idx: g.heatmaps(x[idx], [prompts[i] for i in idx]),
        )[1],
        "maskclip": lambda: (
            m := fresh(MaskCLIP, MaskCLIPParams(templates="photo")),
            lambda idx: list(m.class_logits(x[idx], names)),
        )[1],
        "legrad": lambda: (
            lg := fresh(LeGrad, LeGradParams()),
            lambda idx: lg.heatmaps(x[idx], [prompts[i] for i in idx]),
        )[1],
    }
    for method, make in cases.items():
        runs = [((label, bs), _per_image(make(), N, order, bs)) for label, order, bs in RUNS]
        _assert_same_bits(method, runs)

    mi = MaskInversion(tiny_vit.model, MaskInversionParams(iterations=5))
    results = [
        ((label, bs), _per_image(lambda idx: mi.embed(x[idx], [masks[i] for i in idx], return_maps=True), N, order, bs))
        for label, order, bs in RUNS
    ]
    for part in ("embeddings", "loss", "maps"):
        runs = [(key, [getattr(r, part) for r in out]) for key, out in results]
        _assert_same_bits(f"maskinversion {part}", runs)


# ------------------------------------------------------------------ text


def test_a_name_is_encoded_the_same_whatever_else_is_encoded(tiny_vit):
    def encoder():
        return TextEncoder(tiny_vit.model, tiny_vit.tokenizer)

    others = [n for n in CLASSES if n != "red circle"] + ["a dog", "a very long prompt about nothing in particular"]
    for templates in ("photo", "raw", ["{}", "a photo of {}", "there is {}"]):
        alone = encoder().encode(["red circle"], templates)[0]
        with_others = encoder().encode([*others[:5], "red circle", *others[5:]], templates)[5]
        cached = encoder()
        cached.encode(others[:7], templates)
        cached.encode(others[7:], templates)
        after = cached.encode(["a dog", "red circle", "blue square"], templates)[1]
        for label, e in (("with others", with_others), ("after others filled the cache", after)):
            assert torch.equal(alone, e), (
                f"{templates}: encoded {label} differs by {float((alone - e).abs().max()):.3g}"
            )
        # a template set longer than a text forward holds is chunked the same way whatever else is encoded
        small = TextEncoder(tiny_vit.model, tiny_vit.tokenizer, batch_size=2)
        alone = small.encode(["red circle"], templates)[0]
        small = TextEncoder(tiny_vit.model, tiny_vit.tokenizer, batch_size=2)
        chunked = small.encode([*others[:3], "red circle"], templates)[3]
        assert torch.equal(alone, chunked), (
            f"{templates}: chunked differs by {float((alone - chunked).abs().max()):.3g}"
        )


# ------------------------------------------------------------------ why: the kernels round differently per batch size
# (the methods batch everything, one computation per batch, and avoid these paths; tests/unit/test_op_counts.py)


def _batch_effects(tiny_vit):
    """Largest change of a row's result when the same row runs with other rows, for the two products that made
    results depend on batching: the head's ``[B, C] @ proj`` (a matrix-vector product for B = 1, a matrix product
    for B > 1) and a text forward of one prompt alone vs with others."""
    g = torch.Generator().manual_seed(0)
    proj = tiny_vit.model.visual.proj.detach()
    rows = torch.randn(8, proj.shape[0], generator=g)
    head = max(float(((rows[:1] @ proj) - (rows[:b] @ proj)[:1]).abs().max()) for b in (2, 3, 8))
    tokens = tiny_vit.tokenizer(["a photo of a red circle.", *[f"a photo of a {n}." for n in CLASSES[1:8]]])
    with torch.no_grad():
        alone = tiny_vit.model.encode_text(tokens[:1])
        text = max(float((alone - tiny_vit.model.encode_text(tokens[:b])[:1]).abs().max()) for b in (2, 3, 8))
    return head, text


def test_rows_matmul_rounds_a_row_alike_in_any_batch(tiny_vit):
    """The guard the methods use: a row's product is the same alone, with others, and in its gradient."""
    from clipmaps.actors.vit import rows_matmul

    g = torch.Generator().manual_seed(1)
    proj = tiny_vit.model.visual.proj.detach().contiguous()
    rows = torch.randn(20, proj.shape[0], generator=g)
    alone = rows_matmul(rows[:1], proj)
    for b in (2, 3, 8, 20):
        assert torch.equal(rows_matmul(rows[:b], proj)[:1], alone), b
    grads = []
    for b in (1, 3, 20):
        x = rows[:b].clone().requires_grad_(True)
        (rows_matmul(x, proj, proj.T.contiguous()) * torch.arange(proj.shape[1])).sum().backward()
        grads.append(x.grad[:1])
    assert all(torch.equal(grads[0], gr) for gr in grads[1:])


def test_batch_effects_of_the_kernels_are_bounded(tiny_vit):
    head, text = _batch_effects(tiny_vit)
    # measured on the 2-core CPU (one thread), unnormalised outputs of the tiny model: head 3.6e-7, text 4.8e-7
    assert head <= 1e-5 and text <= 1e-5


@pytest.mark.xfail(strict=False, reason="BLAS kernels may round a row differently with another batch size (see above)")
def test_kernels_alone_are_batch_invariant(tiny_vit):
    """Why the methods keep one-row products off the BLAS's matrix-vector kernel (``actors/vit.py``, ``rows_matmul``)
    and the text encoder encodes each name in a forward of its own: where this fails, a naive batched product would
    change results (it fails on the 2-core CPU: the head's product differs by 3.6e-7 between B = 1 and B > 1, a text
    forward by 4.8e-7)."""
    assert _batch_effects(tiny_vit) == (0.0, 0.0)

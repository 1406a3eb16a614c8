"""The synthetic scene generator: deterministic, exact ground truth at any size."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from clipmaps.jobs.synth.scenes import CLASSES, class_index, make_scene, render, render_scene, sample_spec


def test_a_seed_gives_the_same_scene_and_another_seed_another():
    a, b, c = make_scene(5), make_scene(5), make_scene(6)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image)) and a.names == b.names
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


@pytest.mark.parametrize("seed", range(12))
def test_masks_label_map_and_names_agree(seed):
    scene = make_scene(seed, size=(160, 120))
    assert scene.masks.shape == (len(scene.names), 120, 160) and len(scene.names) >= 1
    assert not (scene.masks.sum(0) > 1).any()  # visible masks never overlap
    for k, (name, mask) in enumerate(zip(scene.names, scene.masks)):
        alone = dataclasses.replace(scene.spec, objects=(scene.spec.objects[k],))
        assert name in CLASSES and mask.sum() > 0.4 * (render(alone, (160, 120))[1] > 0).sum()  # mostly visible
        assert (scene.label_map[mask] == class_index(name) + 1).all()
    assert (scene.label_map[~scene.masks.any(0)] == 0).all()
    assert all(n in scene.caption for n in scene.names)


def test_objects_have_their_colour_in_the_image():
    from clipmaps.jobs.synth.scenes import COLOURS

    for seed in range(6):
        scene = make_scene(seed)
        pixels = np.asarray(scene.image).astype(float)
        for name, mask in zip(scene.names, scene.masks):
            colour = np.asarray(COLOURS[name.split()[0]], float)
            inside = pixels[mask].mean(0)
            # textures darken the fill; the hue stays: the colour's direction in RGB
            cos = inside @ colour / (np.linalg.norm(inside) * np.linalg.norm(colour))
            assert cos > 0.97, (name, inside)


def test_one_spec_renders_consistently_at_two_sizes():
    spec = sample_spec(np.random.default_rng(3), objects=2)
    _, small = render(spec, (64, 48))
    _, large = render(spec, (320, 240))
    down = large[2::5, 2::5]  # the large image's pixel centres nearest the small one's
    assert (down == small).mean() > 0.97


def test_empty_scenes_have_no_objects_and_a_background_caption():
    scene = render_scene(sample_spec(np.random.default_rng(0), objects=0), (64, 64))
    assert scene.names == [] and scene.masks.shape == (0, 64, 64) and not scene.label_map.any()
    assert scene.caption == "background"

"""The tiles Shapes layer: shown one step after its add, its blank text visual never drawn."""

from napari_normcheck import _tile_layers
from napari_normcheck._qt.results import ResultLayers
from napari_normcheck._qt.steps import StepQueue, step
from napari_normcheck._qt.tile_outlines import TILES_NAME
from napari_normcheck.core.base.tiling import plan_tiles


def tiles_of(results):
    from napari.layers import Shapes

    data, kwargs, _ = _tile_layers.tile_shapes_layer(
        results.plan, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), name=TILES_NAME
    )
    return Shapes(data, **kwargs)


def text_visual(viewer, layer):
    return viewer.window._qt_viewer.canvas.layer_to_visual[layer].node.text


def test_tiles_layer_is_shown_by_the_next_step_without_its_blank_text(make_napari_viewer):
    viewer = make_napari_viewer()
    results = ResultLayers(viewer)
    results.plan = plan_tiles((8, 32, 32), (8, 16, 16), overlap=0.25)
    results.steps.add(step("later", lambda: None))
    results._put_tiles(tiles_of(results))
    layer = results.tiles_layer
    assert layer in viewer.layers and not layer.visible  # added hidden: drawn at the next step
    names = [s.step_name for s in results.steps._steps]
    assert names == ["show tiles", "later"]  # before what was queued already
    results.steps.run_all()
    assert layer.visible
    # The layer has no text: napari's blank text visual is not drawn; text given shows it.
    node = text_visual(viewer, layer)
    assert not node.visible
    layer.features = layer.features  # what a refresh of the outlines' disparity does
    assert not node.visible
    layer.text = "{tile}"
    assert node.visible
    shown = {str(t) for t in layer.features["tile"]}
    assert len(node.text) > 0 and set(node.text) <= shown  # napari kept the visual up to date
    layer.text.visible = False
    assert not node.visible


def test_a_new_run_shows_tiles_whose_show_step_it_drops(make_napari_viewer):
    viewer = make_napari_viewer()
    results = ResultLayers(viewer)
    results.plan = plan_tiles((8, 32, 32), (8, 16, 16), overlap=0.25)
    results._put_tiles(tiles_of(results))
    assert not results.tiles_layer.visible
    results.new_run()
    assert len(results.steps) == 0 and results.tiles_layer.visible


def test_show_keeps_tiles_visible_at_once(make_napari_viewer):
    viewer = make_napari_viewer()
    results = ResultLayers(viewer)
    results.plan = plan_tiles((8, 32, 32), (8, 16, 16), overlap=0.25)
    results._synchronous = True
    results._show_tiles(None)
    assert results.tiles_layer.visible and len(results.steps) == 0


def test_step_queue_add_first_runs_before_the_queued_steps(qtbot):
    ran = []
    queue = StepQueue()
    queue.add(step("a", ran.append, "a"))
    queue.add_first(step("b", ran.append, "b"), step("c", ran.append, "c"))
    with qtbot.waitSignal(queue.drained, timeout=2000):
        pass
    assert ran == ["b", "c", "a"]


def test_outline_colours_follow_the_verdicts_rule_on_a_fixed_scale():
    import numpy as np

    scale = {text: color for _low, color, text in _tile_layers.TILE_COLOR_SCALE}
    hard = np.array([0.01, 0.05, 0.4, 0.9, np.nan, np.nan])
    judged = np.array([True, True, True, False, False, True])
    colors = _tile_layers.tile_edge_colors(hard, judged=judged)
    np.testing.assert_allclose(colors[0], scale["below 0.02 (low)"])
    np.testing.assert_allclose(colors[1], scale["0.02 to 0.1 (moderate)"])
    np.testing.assert_allclose(colors[2], scale["0.1 and above (high)"])
    # Not judged: grey whatever the hard value (the verdict ignores it), NaN included.
    np.testing.assert_allclose(colors[3], _tile_layers.NOT_JUDGED_COLOR)
    np.testing.assert_allclose(colors[4], _tile_layers.NOT_JUDGED_COLOR)
    # A tile not run yet has a look of its own: no colour of the legend means two things.
    np.testing.assert_allclose(colors[5], _tile_layers.UNKNOWN_TILE_COLOR)
    legend = _tile_layers.tile_color_legend()
    rgb = [tuple(np.round(color[:3], 3)) for color, _text in legend]
    assert len(set(rgb)) == len(rgb)
    unknown = np.asarray(_tile_layers.UNKNOWN_TILE_COLOR)
    assert unknown[3] < 1.0 and unknown[2] > unknown[0]  # translucent, blue-ish
    # The scale is fixed: the same value has the same colour in every run.
    np.testing.assert_allclose(
        _tile_layers.tile_edge_colors(np.array([0.06]))[0], scale["0.02 to 0.1 (moderate)"]
    )


def test_outline_features_carry_hard_values_and_judged_flags():
    import numpy as np

    plan = plan_tiles((8, 32, 32), (8, 16, 16), overlap=0.25)
    hard = np.linspace(0.0, 0.3, plan.n_tiles)
    judged = np.arange(plan.n_tiles) % 2 == 0
    data, kwargs, _ = _tile_layers.tile_shapes_layer(
        plan, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), disparity=hard, judged=judged
    )
    features = kwargs["features"]
    tiles = np.asarray(features["tile"])
    np.testing.assert_allclose(features["disparity"], hard[tiles])
    np.testing.assert_array_equal(features["judged"], judged[tiles])
    np.testing.assert_allclose(
        kwargs["edge_color"], _tile_layers.tile_edge_colors(hard, judged=judged)[tiles]
    )

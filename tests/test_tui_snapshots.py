"""SVG snapshots of every review screen at 80x24 (SSH terminal) and 120x40.

Deterministic by construction: a fixed plan written as ./merge.plan (relative path, so
no tmp directory shows), a fixed model-status checker, workers awaited, notifications
cleared and input cursors not blinking. Regenerate with
`python -m pytest tests/test_tui_snapshots.py --snapshot-update` and review the SVGs.
"""

import pytest
from textual.widgets import Input

from mergeplan.plan import write_plan
from mergeplan_tui.app import make_app
from mergeplan_tui.widgets.plangrid import PlanGrid
from test_tui_app import fixed_status, review_plan

SIZES = [pytest.param((80, 24), id="80x24"), pytest.param((120, 40), id="120x40")]


@pytest.fixture
def plan_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_plan(review_plan(), "merge.plan")
    return "merge.plan"


async def settle(pilot) -> None:
    app = pilot.app
    await app.workers.wait_for_complete()
    await pilot.pause()
    app.clear_notifications()
    for inp in app.screen.query(Input):
        inp.cursor_blink = False
    await pilot.pause()


async def edit_l1_gate(pilot) -> None:
    """One density edit on layer 1 gate [math], cursor there. Through the app's own entry
    points rather than key by key: test_tui_app drives the keys; this keeps snapshots fast."""
    app = pilot.app
    grid = app.screen.query_one(PlanGrid)
    grid.move_cursor(grid.gm.rows.index(1), grid.col_keys.index(("gate", "math")))
    app.editor.set([("model.layers.1.mlp.gate_proj.weight", "math")], "density", 0.52)
    app.plan_changed()
    await pilot.pause()


def steps(*keys, edit=False):
    async def run_before(pilot):
        if edit:
            await edit_l1_gate(pilot)
        if keys:
            await pilot.press(*keys)
        await settle(pilot)

    return run_before


SCREENS = {
    # grid with one edited cell (*) and a marked box (underlined) from L1 gate to L2 down
    "grid": steps("space", "down", "right", "right", edit=True),
    "overview": steps("o"),
    "detail": steps("enter", edit=True),  # the edited tensor: density was/now, digest dropped
    "edit_invalid": steps("e", "1", ".", "5"),
    "diff": steps("d", edit=True),
    "save_as": steps("S", edit=True),
    "quit_confirm": steps("q", edit=True),
    "help": steps("question_mark"),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen_snapshot(snap_compare, plan_file, screen, size):
    app = make_app(plan_file, model_checker=fixed_status)
    assert snap_compare(app, terminal_size=size, run_before=SCREENS[screen])


# A small terminal: the footer still shows Save, Help and Quit; the grid scrolled sideways
# still names the model its columns belong to.
SMALL = {
    "grid_scrolled": steps(*["right"] * 12, edit=True),
    "edit_box": steps("space", "down", "right", "right", "e"),
}


@pytest.mark.parametrize("screen", list(SMALL))
def test_small_terminal_snapshot(snap_compare, plan_file, screen):
    app = make_app(plan_file, model_checker=fixed_status)
    assert snap_compare(app, terminal_size=(60, 20), run_before=SMALL[screen])

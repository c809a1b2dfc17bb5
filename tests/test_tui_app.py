"""The review app driven by keyboard (and mouse) through Pilot: navigate, edit ranges,
undo/redo, save and reopen, refuse invalid values, ask before losing edits."""

import asyncio
import io

import msgpack
import numpy as np
import pytest

from rich.console import Console

from mergeplan.errors import PlanFormatError
from mergeplan.plan import read_plan, write_plan
from mergeplan_tui import run_review
from mergeplan_tui.app import make_app
from mergeplan_tui.fingerprint import make_checker
from mergeplan_tui.screens.detail import DetailScreen
from mergeplan_tui.screens.dialogs import ConfirmScreen, PathScreen, QuitScreen
from mergeplan_tui.screens.diff import DiffScreen
from mergeplan_tui.screens.edit import EditScreen
from mergeplan_tui.screens.grid import GridScreen
from mergeplan_tui.screens.help import HelpScreen
from mergeplan_tui.screens.overview import render_overview
from mergeplan_tui.widgets.plangrid import PlanGrid
from plan_factory import make_plan

STATUS = {"base": "found", "math": "changed: shard model-00001.safetensors differs", "code": "missing (no directory ./code)"}


def fixed_status(ref):
    return STATUS.get(ref.id, "found")


def review_plan(layers: int = 6):
    """The factory plan plus what guides record: parameters, calibration, Sens per-layer
    statistics and one earlier edit (fixed time, so screens are reproducible)."""
    plan = make_plan(layers=layers, models=("math", "code"))
    plan.guides = {"lewis": {"gamma": 0.3, "epsilon": 0.8, "mode": "minmax"}, "aim": {"omega": 0.4}}
    plan.calibration = {"samples": 15, "seq_len": 256, "data": "sha256:" + "ab" * 8}
    groups = layers + 3
    plan.stats = {"sens": {"alpha": {"math": np.linspace(0.1, 0.9, groups).astype(np.float32),
                                     "code": np.linspace(0.9, 0.1, groups).astype(np.float32)},
                           "tau": {"math": 0.6, "code": 0.4}}}
    plan.edit_log = [{"time": "2026-01-02T03:04:05+00:00", "tool": "review",
                      "changes": [["model.layers.0.mlp.up_proj.weight", "math", "weight", 1.0, 1.1]]}]
    return plan


def write(tmp_path, plan=None, name="merge.plan"):
    path = tmp_path / name
    write_plan(plan or review_plan(), path)
    return path


def run(coro):
    return asyncio.run(coro)


def plain(renderable, width: int = 120) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def cursor_at(grid: PlanGrid, layer: int, comp: str, model: str | None):
    return grid.gm.rows.index(layer), grid.col_keys.index((comp, model))


async def goto(pilot, grid: PlanGrid, layer: int, comp: str, model: str | None):
    """Move there with arrow keys only, as a user would."""
    row, col = cursor_at(grid, layer, comp, model)
    r, c = grid.cursor
    keys = ["down" if row > r else "up"] * abs(row - r) + ["right" if col > c else "left"] * abs(col - c)
    if keys:
        await pilot.press(*keys)
    assert grid.cursor == (row, col)


def test_navigate_open_detail_step_and_back(tmp_path):
    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            grid = app.screen.query_one(PlanGrid)
            assert isinstance(app.screen, GridScreen)
            assert grid.at(*grid.cursor) == (0, "q", "math")  # starts on the first layer's first projection
            await goto(pilot, grid, 3, "down", "code")
            await pilot.press("enter")
            assert isinstance(app.screen, DetailScreen)
            assert app.screen.tensor == "model.layers.3.mlp.down_proj.weight"
            await pilot.press("right_square_bracket")
            assert app.screen.tensor == "model.layers.3.input_layernorm.weight"
            await pilot.press("left_square_bracket", "left_square_bracket")
            assert app.screen.tensor == "model.layers.3.mlp.up_proj.weight"
            await pilot.press("escape")
            assert isinstance(app.screen, GridScreen)
            await pilot.press("o")
            assert type(app.screen).__name__ == "OverviewScreen"
            await pilot.press("g")
            assert app.screen.query_one(PlanGrid).cursor == cursor_at(grid, 3, "down", "code")

    run(go())


def test_mouse_click_moves_cursor_then_opens(tmp_path):
    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(120, 40)) as pilot:
            grid = app.screen.query_one(PlanGrid)
            row, col = cursor_at(grid, 2, "k", "math")
            offset = (5 + col * 5 + 1, 2 + row)  # label column 5 wide, cells 5 wide, 2 header lines
            await pilot.click(PlanGrid, offset=offset)
            assert grid.cursor == (row, col)
            await pilot.click(PlanGrid, offset=offset)
            assert isinstance(app.screen, DetailScreen)
            assert app.screen.tensor == "model.layers.2.self_attn.k_proj.weight"

    run(go())


def test_range_edit_undo_redo_save_and_reopen(tmp_path):
    path = write(tmp_path)
    before = read_plan(path)

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            grid = app.screen.query_one(PlanGrid)
            # mark layers 1..3 x gate..down for model math, then edit the box
            await goto(pilot, grid, 1, "gate", "math")
            await pilot.press("space")
            await goto(pilot, grid, 3, "down", "math")
            await pilot.press("e")
            assert isinstance(app.screen, EditScreen)
            form = {i.id: i.value for i in app.screen.query("Input")}
            assert form["layers"] == "1-3" and form["components"] == "gate,up,down" and form["models"] == "math"
            await pilot.press("0", ".", "5", "2", "enter")  # no factory density is 0.52
            assert isinstance(app.screen, GridScreen)
            ed = app.editor
            edited = [(f"model.layers.{layer}.mlp.{c}_proj.weight", "math")
                      for layer in (1, 2, 3) for c in ("gate", "up", "down")]
            assert all(ed.get(t, m, "density") == 0.52 for t, m in edited)
            assert ed.get("model.layers.1.mlp.up_proj.weight", "code", "density") != 0.52
            assert ed.get("model.layers.4.mlp.up_proj.weight", "math", "density") != 0.52
            row, col = cursor_at(grid, 2, "up", "math")
            assert grid._cells[row][col][0] == ".520*"  # the edited marker
            assert "unsaved" in app.sub_title
            await pilot.press("u")
            assert all(ed.get(t, m, "density") == before.tensor(t).contribution(m).density for t, m in edited)
            assert not app.pending_count and grid._cells[row][col][0].endswith(" ")
            await pilot.press("r")
            assert all(ed.get(t, m, "density") == 0.52 for t, m in edited)
            await pilot.press("s")
            assert not app.pending_count and "unsaved" not in app.sub_title
            return edited

    edited = run(go())
    back = read_plan(path)
    for t, m in edited:
        c = back.tensor(t).contribution(m)
        assert c.density == 0.52 and c.mask["digest"] is None and c.source["density"] == "edit"
        assert c.mask["kind"] == before.tensor(t).contribution(m).mask["kind"]
    untouched = back.tensor("model.layers.1.mlp.up_proj.weight").contribution("code")
    assert untouched.mask == before.tensor("model.layers.1.mlp.up_proj.weight").contribution("code").mask
    assert len(back.edit_log) == 2  # the earlier entry plus this save
    entry = back.edit_log[-1]
    assert entry["tool"] == "review" and entry["time"]
    logged = {(c[0], c[1], c[2]): (c[3], c[4]) for c in entry["changes"]}
    assert set(logged) == {(t, m, "density") for t, m in edited}
    t0, m0 = edited[0]
    assert logged[(t0, m0, "density")] == (before.tensor(t0).contribution(m0).density, 0.52)


def test_scale_weights_of_attention_for_one_model(tmp_path):
    path = write(tmp_path)

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(120, 40)) as pilot:
            app.screen.action_edit()
            await pilot.pause()
            s = app.screen
            s.query_one("#field").value = "weight"
            s.query_one("#action").value = "scale"
            s.query_one("#layers").value = "0-1"
            s.query_one("#components").value = "attn"
            s.query_one("#models").value = "code"
            s.query_one("#value").value = "1.25"
            await pilot.pause()
            assert "weight of 8 tensors (q, k, v, o) x 1 model: 1 -> 1.25" in str(s.query_one("#edit-preview").render())
            await pilot.click("#apply")
            await pilot.pause()
            ed = app.editor
            assert ed.get("model.layers.1.self_attn.o_proj.weight", "code", "weight") == 1.25
            # reset layer 1 back to the planned weights; layer 0 keeps its edit
            app.screen.action_edit()
            await pilot.pause()
            s = app.screen
            for key, value in (("#field", "weight"), ("#action", "reset"), ("#layers", "1"),
                               ("#components", "attn"), ("#models", "code")):
                s.query_one(key).value = value
            await pilot.pause()
            assert s.query_one("#value").disabled
            await pilot.press("enter")
            await pilot.pause()
            assert ed.get("model.layers.1.self_attn.o_proj.weight", "code", "weight") == 1.0
            return ed

    ed = run(go())
    for layer in range(6):
        for c in ("q", "k", "v", "o", "gate"):
            name = f"model.layers.{layer}.{'mlp' if c == 'gate' else 'self_attn'}.{c}_{'proj'}.weight"
            want = 1.25 if (layer == 0 and c != "gate") else 1.0
            assert ed.get(name, "code", "weight") == want
            assert ed.get(name, "math", "weight") == 1.0


def test_invalid_values_are_refused_inline(tmp_path):
    path = write(tmp_path)

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("e", "1", ".", "5")
            s = app.screen
            assert "density must be in (0, 1], got 1.5" in str(s.query_one("#edit-error").render())
            assert s.query_one("#apply").disabled
            await pilot.press("enter")
            assert isinstance(app.screen, EditScreen)  # still open, nothing applied
            # scaling a density past 1 is refused too, naming where
            s.query_one("#action").value = "scale"
            s.query_one("#value").value = "3"
            await pilot.pause()
            assert "density must be in (0, 1]" in str(s.query_one("#edit-error").render())
            s.query_one("#layers").value = "99"
            await pilot.pause()
            assert "past the last layer (5)" in str(s.query_one("#edit-error").render())
            await pilot.press("escape")
            assert isinstance(app.screen, GridScreen)
            assert not app.editor.dirty

    run(go())


def test_quit_asks_before_losing_edits(tmp_path):
    path = write(tmp_path)

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("e", "0", ".", "9", "enter")
            assert app.pending_count == 1
            await pilot.press("q")
            assert isinstance(app.screen, QuitScreen)
            await pilot.press("escape")  # Cancel: back to the review, edits kept
            assert isinstance(app.screen, GridScreen) and app.is_running and app.pending_count == 1
            await pilot.press("q")
            await pilot.press("d")  # Discard
            await pilot.pause()
            assert not app.is_running
        return app.return_code

    assert run(go()) == 0
    assert read_plan(path).tensor("model.layers.0.self_attn.q_proj.weight").contribution("math").density != 0.9

    async def clean():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("q")  # nothing to lose: quits at once
            await pilot.pause()
            assert not app.is_running

    run(clean())


def test_save_as_new_file_keeps_the_original(tmp_path):
    path = write(tmp_path)
    original = path.read_bytes()
    other = tmp_path / "edited.plan"

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("e", "0", ".", "7", "enter", "S")
            assert isinstance(app.screen, PathScreen)
            app.screen.query_one("Input").value = str(other)
            await pilot.press("enter")
            await pilot.pause()
            assert app.editor.path == str(other) and not app.pending_count

    run(go())
    assert path.read_bytes() == original
    saved = read_plan(other)
    assert saved.tensor("model.layers.0.self_attn.q_proj.weight").contribution("math").density == 0.7
    assert len(saved.edit_log) == 2


def test_diff_against_loaded_and_other_plan(tmp_path):
    other_plan = review_plan()
    other_plan.tensor("model.layers.5.mlp.down_proj.weight").contributions[1].weight = 0.5
    other = write(tmp_path, other_plan, "other.plan")
    path = write(tmp_path)

    async def go():
        app = make_app(str(path), compare=str(other), model_checker=fixed_status)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("d")
            assert isinstance(app.screen, DiffScreen)
            table = app.screen.query_one("#diff-table")
            rows = [table.get_row_at(i) for i in range(table.row_count)]
            assert ["L5 mlp.down_proj.weight", "code", "weight", "0.5 -> 1"] in [[str(x) for x in r] for r in rows]
            await pilot.press("t")  # vs the plan as loaded: nothing yet
            assert table.row_count == 0
            await pilot.press("g", "e", "0", ".", "4", "enter", "d")
            fields = sorted(str(table.get_row_at(i)[2]) for i in range(table.row_count))
            assert fields == ["density", "mask.digest"]  # the edit and the dropped digest

    run(go())


def test_diff_screen_fits_60_columns_and_names_what_apply_recomputes(tmp_path):
    """At 60x20 the old -> new column was cut off (fixed 80-column widths): now the tensor
    name gives way, and a digest the edit dropped reads "at apply", not "-"."""
    from test_tui_hostile import screen_text

    other = write(tmp_path, review_plan(), "other.plan")
    path = write(tmp_path)

    async def go():
        app = make_app(str(path), compare=str(other), model_checker=fixed_status)
        async with app.run_test(size=(60, 20)) as pilot:
            await pilot.press("e", "0", ".", "4", "enter", "d", "t")
            await pilot.pause()
            assert isinstance(app.screen, DiffScreen)
            lines = screen_text(app).splitlines()
            assert "as loaded (old) -> this plan (new)" in " ".join(lines[1:3])
            change = [ln for ln in lines if ln.startswith(" L0 ")]
            assert len(change) == 2 and all(len(ln.rstrip()) <= 60 for ln in change)
            assert change[0].split()[-4:] == ["density", "0.6", "->", "0.4"], change
            assert change[1].split()[-5:] == ["mask.digest", "00000000", "->", "at", "apply"], change
            # The name column gives way at 60 columns; the line under the table has it whole.
            row = str(app.screen.query_one("#diff-row").render())
            assert row == "model.layers.0.self_attn.q_proj.weight [math] density: 0.6 -> 0.4", row
            await pilot.press("t")  # the other plan: the label is its path
            await pilot.pause()
            bar = str(app.screen.query_one("#diff-bar").render())
            assert f"2 differences: {other} (old) -> this plan (new)" in bar, bar

    run(go())


def test_quantity_switch_and_model_filter(tmp_path):
    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            grid = app.screen.query_one(PlanGrid)
            assert grid.quantity.key == "density"
            await pilot.press("v")
            assert grid.quantity.key == "weight" and grid.at(*grid.cursor)[1:] == ("q", "math")
            await pilot.press("v", "v")
            assert grid.quantity.key == "omega" and {m for _, m in grid.col_keys} == {None}
            await pilot.press("V", "V", "V", "m")
            assert grid.quantity.key == "density" and {m for _, m in grid.col_keys} == {"math"}
            await pilot.press("m")
            assert {m for _, m in grid.col_keys} == {"code"}

    run(go())


def test_help_lists_every_binding(tmp_path):
    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("question_mark")
            assert isinstance(app.screen, HelpScreen)
            text = plain(app.screen._render_keys())
            for b in [*type(app).BINDINGS, *GridScreen.BINDINGS, *PlanGrid.BINDINGS, *DetailScreen.BINDINGS,
                      *DiffScreen.BINDINGS, *EditScreen.BINDINGS]:
                if b.action == "switch_mode('tuning')":  # listed only for a plan a search made
                    assert b.tooltip not in text
                    continue
                assert b.tooltip in text
            await pilot.press("escape")
            assert isinstance(app.screen, GridScreen)

    run(go())


def test_overview_shows_model_status_from_the_worker(tmp_path):
    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("o")
            await app.workers.wait_for_complete()
            await pilot.pause()
            text = plain(render_overview(app.session), width=200)
            assert "changed: shard model-00001" in text and "missing (no directory" in text
            assert "sha256:" in text and "lewis.gamma" in text and "2026-01-02T03:04:05" in text

    run(go())


def test_plan_without_task_models_or_tensors_still_opens(tmp_path):
    from mergeplan.plan import ModelRef, Plan

    plans = [make_plan(layers=2, models=()), Plan(method="linear", models=[ModelRef("base", "base", "./b")], tensors=[])]

    async def go(path):
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("down", "space", "e", "escape", "v", "m", "enter", "d", "o", "g")
            assert isinstance(app.screen, GridScreen)

    for i, plan in enumerate(plans):
        run(go(write(tmp_path, plan, f"p{i}.plan")))


def test_real_checker_reports_missing_model_dirs(tmp_path):
    plan = review_plan()
    check = make_checker(plan, str(tmp_path / "merge.plan"))
    assert check(plan.models[1]).startswith(("missing", "not checked"))


def test_corrupt_and_newer_plans_raise_plan_format_error(tmp_path):
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"\x93not a plan")
    with pytest.raises(PlanFormatError, match="not a mergeplan plan"):
        make_app(str(bad))
    newer = tmp_path / "newer.plan"
    newer.write_bytes(msgpack.packb(["mergeplan", 99, b"", "sha256:00"], use_bin_type=True))
    with pytest.raises(PlanFormatError, match="newer mergeplan"):
        make_app(str(newer))
    with pytest.raises(PlanFormatError, match="newer mergeplan"):
        run_review(str(newer))
    good = write(tmp_path)
    with pytest.raises(PlanFormatError, match="not found"):
        make_app(str(good), compare=str(tmp_path / "absent.plan"))


def _with_post_norms(layers: int = 6):
    """review_plan plus the post-attention norm between o and gate, as in Llama."""
    from mergeplan.plan import Contribution, TensorPlan

    plan = review_plan(layers)
    for layer in range(layers):
        i = plan.tensors.index(plan.tensor(f"model.layers.{layer}.mlp.gate_proj.weight"))
        plan.tensors.insert(i, TensorPlan(f"model.layers.{layer}.post_attention_layernorm.weight", (64,), "bfloat16",
                                          params={"lambda": 1.0},
                                          contributions=[Contribution(m, 1.0) for m in ("math", "code")]))
    return plan


def test_box_edit_over_the_projections_leaves_the_norm_between_them(tmp_path):
    path = write(tmp_path, _with_post_norms())

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            grid = app.screen.query_one(PlanGrid)
            assert grid.at(*grid.cursor) == (0, "q", "math")
            await pilot.press("space", "down", *["right"] * 7)  # L0 q .. L1 down, across "post"
            assert grid.at(*grid.cursor) == (1, "down", "math")
            await pilot.press("e")
            s = app.screen
            preview = str(s.query_one("#edit-preview").render())
            assert "density of 14 tensors (q, k, v, o, gate, up, down) x 1 model" in preview
            assert not s.query_one("#vectors").value
            await pilot.press("0", ".", "5", "enter")
            await pilot.pause()
            return app.editor

    ed = run(go())
    for layer in (0, 1):
        norm = ed.plan.tensor(f"model.layers.{layer}.post_attention_layernorm.weight").contribution("math")
        assert norm.mask is None and norm.density == 1.0  # untouched: dense, as planned
        assert ed.get(f"model.layers.{layer}.mlp.down_proj.weight", "math", "density") == 0.5
    assert len(ed.pending()) == 14


async def _weight_edit_of_a_box_across_a_norm(app, pilot):
    """Mark L0 q .. L1 down (across the `post` norm column), open the edit dialog on weight."""
    await pilot.press("space", "down", *["right"] * 7, "e")
    s = app.screen
    s.query_one("#field").value = "weight"
    await pilot.pause()
    return s


def test_ticking_1d_takes_in_the_norms_of_a_box_and_grid_labels_name_components(tmp_path):
    """The box's components include its norm columns, so the 1-D tick takes them in (it did
    nothing when the prefill dropped them); the preview says how many it leaves out until
    then. Components also take the grid's column labels (in_n, post)."""
    path = write(tmp_path, _with_post_norms())

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            s = await _weight_edit_of_a_box_across_a_norm(app, pilot)
            preview = str(s.query_one("#edit-preview").render())
            assert "weight of 14 tensors (q, k, v, o, gate, up, down) x 1 model; 2 1-D tensors left out" in preview
            s.query_one("#vectors").value = True
            await pilot.pause()
            preview = str(s.query_one("#edit-preview").render())
            assert "weight of 16 tensors (q, k, v, o, post_norm, gate, up, down) x 1 model" in preview, preview
            assert "left out" not in preview
            await pilot.press("0", ".", "9", "enter")
            await pilot.pause()
            await pilot.press("e")
            s = app.screen
            s.query_one("#components").value = "post"
            s.query_one("#layers").value = "2-3"
            s.query_one("#field").value = "weight"
            await pilot.pause()
            assert "2 1-D tensors left out: tick 1-D to include" in str(s.query_one("#edit-error").render())
            s.query_one("#vectors").value = True
            await pilot.pause()
            preview = str(s.query_one("#edit-preview").render())
            assert "weight of 2 tensors (post_norm) x 1 model" in preview, preview
            return app.editor

    ed = run(go())
    for layer in (0, 1):
        assert ed.get(f"model.layers.{layer}.post_attention_layernorm.weight", "math", "weight") == 0.9
    assert len(ed.pending()) == 16


def test_norm_columns_alone_are_an_explicit_choice(tmp_path):
    path = write(tmp_path, _with_post_norms())

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            grid = app.screen.query_one(PlanGrid)
            grid.move_cursor(grid.gm.rows.index(2), grid.col_keys.index(("post_norm", "code")))
            await pilot.press("e")
            s = app.screen
            assert s.query_one("#vectors").value and s.query_one("#components").value == "post_norm"
            s.query_one("#field").value = "weight"
            await pilot.press("0", ".", "9", "enter")
            await pilot.pause()
            return app.editor

    ed = run(go())
    assert ed.get("model.layers.2.post_attention_layernorm.weight", "code", "weight") == 0.9


def test_edit_errors_name_the_field_being_edited(tmp_path):
    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("e")
            s = app.screen
            s.query_one("#action").value = "scale"
            s.query_one("#value").value = "abc"
            await pilot.pause()
            error = str(s.query_one("#edit-error").render())
            assert error.startswith("density: the scale factor must be a finite number") and "weight" not in error
            s.query_one("#field").value = "weight"
            s.query_one("#action").value = "set"
            await pilot.pause()
            assert str(s.query_one("#edit-error").render()).startswith("weight must be a number")

    run(go())


def test_quit_with_edits_can_save_first(tmp_path):
    path = write(tmp_path)

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.press("e", "0", ".", "9", "enter", "q")
            assert isinstance(app.screen, QuitScreen)
            await pilot.press("s")  # Save, then quit
            await pilot.pause()
            assert not app.is_running

    run(go())
    assert read_plan(path).tensor("model.layers.0.self_attn.q_proj.weight").contribution("math").density == 0.9


def test_footer_keeps_save_help_quit_at_60x20(tmp_path):
    from mergeplan_tui.screens.overview import OverviewScreen
    from test_tui_hostile import screen_text

    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(60, 20)) as pilot:
            for keys, screen in (((), GridScreen), (("enter",), DetailScreen), (("escape", "o"), OverviewScreen),
                                 (("d",), DiffScreen)):
                await pilot.press(*keys)
                await pilot.pause()
                assert isinstance(app.screen, screen)
                footer = screen_text(app).splitlines()[-1]
                assert footer.startswith("s Save ? Help q Quit"), (screen, footer)

    run(go())


def test_every_dialog_footer_lists_its_own_keys_at_60x20(tmp_path):
    """A dialog's footer said the grid's keys (e Edit, space Mark, ...), none of which work
    inside it; each now names its own."""
    from mergeplan_tui.screens.dialogs import PathScreen, QuitScreen
    from mergeplan_tui.screens.edit import EditScreen
    from mergeplan_tui.screens.help import HelpScreen
    from test_tui_hostile import screen_text

    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(60, 20)) as pilot:
            for keys, screen, footer in (
                (("question_mark",), HelpScreen, "esc Close"),
                (("escape", "e"), EditScreen, "esc Cancel ^s Apply"),
                (("escape", "slash"), PathScreen, "esc Cancel"),
                (("escape", "g"), PathScreen, "esc Cancel"),
                (("escape", "e", *"0.5", "enter", "q"), QuitScreen, "s Save and quit d Discard esc Cancel"),
            ):
                await pilot.press(*keys)
                await pilot.pause()
                assert isinstance(app.screen, screen), (keys, app.screen)
                assert screen_text(app).splitlines()[-1].strip() == footer, (screen, screen_text(app))

    run(go())


def test_find_tensor_and_goto_layer(tmp_path):
    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            grid = app.screen.query_one(PlanGrid)
            await pilot.press("slash", *"layers.4.mlp.up", "enter")
            assert grid.at(*grid.cursor) == (4, "up", "math")
            await pilot.press("g", "2", "enter")
            assert grid.at(*grid.cursor) == (2, "up", "math")
            await pilot.press("g", "h", "e", "a", "d", "enter")
            assert grid.at(*grid.cursor)[0] == "head"
            await pilot.press("slash", *"nothing-like-this", "enter")
            await pilot.pause()
            assert grid.at(*grid.cursor)[0] == "head" and isinstance(app.screen, GridScreen)

    run(go())


def test_toasts_leave_the_status_line_and_footer_visible(tmp_path):
    from test_tui_hostile import screen_text

    async def go():
        app = make_app(str(write(tmp_path)), model_checker=fixed_status)
        async with app.run_test(size=(80, 24), notifications=True) as pilot:
            await pilot.press("e", "0", ".", "2", "enter")
            await asyncio.sleep(0.3)
            await pilot.pause()
            lines = screen_text(app).splitlines()
            assert any("density set: 1 value changed" in line for line in lines[:-2])  # the toast is up
            assert lines[-2].strip() == "L0 q [math] density 0.2 (planned 0.6)"
            assert lines[-1].startswith("s Save ? Help q Quit")

    run(go())


def test_review_in_a_real_terminal_opens_and_quits(tmp_path):
    """The CLI path with the real terminal driver (Pilot uses a headless one): the grid
    comes up in a pty, `q` ends the process with exit code 0 and the terminal restored."""
    import os
    import sys

    import pexpect

    path = write(tmp_path)
    env = {**os.environ, "TERM": "xterm-256color", "PYTHONPATH": os.pathsep.join(sys.path)}
    child = pexpect.spawn(sys.executable, ["-m", "mergeplan.cli", "review", str(path)], env=env,
                          dimensions=(24, 80), timeout=60)
    child.expect("density")  # the grid bar is painted
    child.expect("peak L")  # the sparklines too: the screen is up
    child.send("q")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert b"\x1b[?1049l" in child.before  # left the alternate screen


def test_esc_goes_back_to_the_grid_and_the_legend_names_only_what_cells_show(tmp_path):
    """Esc leaves the overview, diff and tuning screens (as it leaves a tensor's detail);
    `? at apply` is in the legend only when a cell shows `?`; the planner's frozen
    `aim.mean_factor` is not a second copy of the live mean AIM factor view."""
    from mergeplan_tui.screens.overview import OverviewScreen

    plan = review_plan()
    for t in plan.tensors:
        if t.contributions and t.contributions[0].mask:
            t.stats.update({"kept": {c.model: c.density for c in t.contributions}, "aim.mean_factor": 0.5})
    path = write(tmp_path, plan)

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(100, 30)) as pilot:
            for key, screen in (("o", OverviewScreen), ("d", DiffScreen)):
                await pilot.press(key)
                assert isinstance(app.screen, screen)
                await pilot.press("escape")
                assert isinstance(app.screen, GridScreen), key
            grid = app.screen.query_one(PlanGrid)
            labels = [q.label for q in grid.gm.quantities()]
            assert "mean AIM factor" in labels and "aim.mean_factor" not in labels
            bar = app.screen.query_one("#grid-bar")

            async def show(label):
                while app.screen.quantity.label != label:
                    await pilot.press("v")
                await pilot.pause()
                return str(bar.render())

            assert "?at apply" not in await show("kept")  # nothing edited yet
            assert "?at apply" not in await show("lewis.delta")
            await show("density")
            await pilot.press("e", "0", ".", "4", "enter")  # L0 q [math]: its kept is now stale
            assert "?at apply" in await show("kept")
            assert "?at apply" not in await show("lewis.delta")

    run(go())


def test_values_set_in_a_saved_session_are_marked_when_the_plan_is_reopened(tmp_path):
    """`*` is this session's unsaved edit; once saved, and when the plan is opened again
    (by its author or whoever receives it), the edit log marks the value `+`. A forged
    log entry of the wrong shape is ignored."""
    plan = review_plan()
    plan.edit_log.append({"time": "x", "tool": "y", "changes": [["model.layers.1.self_attn.k_proj.weight"], [5],
                                                                [None, None, None, None, "nan"]]})
    path = write(tmp_path, plan)

    async def go(keys, size=(100, 30)):
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=size) as pilot:
            await pilot.press(*keys)
            await pilot.pause()
            grid = app.screen.query_one(PlanGrid)
            marks = {grid.at(r, c): grid._cells[r][c][0][-1] for r in range(len(grid._cells))
                     for c in range(len(grid.col_keys)) if grid._cells[r][c][0][-1] in "*+"}
            return marks, str(app.screen.query_one("#grid-bar").render()), app.screen.query_one("#cell-info").text

    marks, bar, _ = run(go(["e", "0", ".", "4", "enter"]))
    assert marks == {(0, "q", "math"): "*"} and "+saved" in bar  # the review_plan's log has an entry
    marks, _, _ = run(go(["e", "0", ".", "4", "enter", "s"]))
    assert marks == {(0, "q", "math"): "+"}
    marks, bar, info = run(go([]))  # reopened
    assert marks == {(0, "q", "math"): "+"} and "+saved" in bar
    assert info.endswith("density 0.4 (set by hand in a saved review)")
    # The review_plan's own log entry sets up_proj's weight to 1.1, which it is not: no mark.
    marks, _, _ = run(go(["v"]))
    assert marks == {}


def test_enter_on_the_1d_tick_applies_instead_of_unticking(tmp_path):
    path = write(tmp_path, _with_post_norms())

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(80, 24)) as pilot:
            s = await _weight_edit_of_a_box_across_a_norm(app, pilot)
            s.query_one("#value").value = "0.9"
            s.query_one("#vectors").focus()
            await pilot.press("space")
            assert s.query_one("#vectors").value
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, GridScreen)  # applied and closed
            return app.editor

    ed = run(go())
    assert len(ed.pending()) == 16  # the 14 projections and the 2 norms the tick took in


def test_a_confirm_dialog_lists_esc_and_esc_answers_no(tmp_path):
    from test_tui_hostile import screen_text

    path = write(tmp_path)
    other = write(tmp_path, name="other.plan")

    async def go():
        app = make_app(str(path), model_checker=fixed_status)
        async with app.run_test(size=(60, 20)) as pilot:
            await pilot.press("e", "0", ".", "4", "enter", "S")
            app.screen.query_one("#path").value = str(other)
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            assert screen_text(app).splitlines()[-1].strip() == "y Yes n No esc Cancel"
            await pilot.press("escape")
            await pilot.pause()
            assert isinstance(app.screen, GridScreen) and app.pending_count == 1  # nothing written

    run(go())
    assert read_plan(other).tensor("model.layers.0.self_attn.q_proj.weight").contribution("math").density != 0.4

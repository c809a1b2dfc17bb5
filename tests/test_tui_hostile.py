"""The review app on a hostile plan: every string a plan carries (and every model status,
path and error message that quotes one) reaches the screen as literal text.

A plan is shared like a lock file, so its strings are someone else's. Read as Textual or
Rich markup, "[/bold]" raised MarkupError and killed the review, "[red]x[/red]" changed
what it shows, and "[@click=app.quit]q[/]" became a button that runs an app action.
Control characters (ESC sequences) and bidi overrides must not reach the terminal either.
"""

import asyncio
import io
import re

import pytest
from rich.cells import cell_len
from rich.console import Console
from textual.content import Content
from textual.widgets import Input, Static

from mergeplan.plan import Contribution, TensorPlan, write_plan
from mergeplan_tui.app import make_app
from mergeplan_tui.richtext import clean, content, fit, markup, text
from mergeplan_tui.screens.detail import DetailScreen, render_tensor
from mergeplan_tui.messages import OpenTensor
from mergeplan_tui.screens.dialogs import ConfirmScreen, PathScreen, QuitScreen
from mergeplan_tui.screens.diff import DiffScreen
from mergeplan_tui.screens.edit import EditScreen
from mergeplan_tui.screens.help import HelpScreen
from mergeplan_tui.screens.overview import render_overview
from mergeplan_tui.widgets.plangrid import PlanGrid
from plan_factory import make_plan

CLOSE = "[/bold]"
RED = "[red]x[/red]"
LINK = "[link=http://evil]click[/link]"
CLICK = "[@click=app.quit]q[/]"
ESCAPED = "\\[escaped]"
BIDI = "\u202eevil\u202c"
ESC = "\x1b[2J\x1b]0;pwned\x07"  # clear screen, set window title
WIDE = "模型[数学]"
LONG = "[b]" + "W" * 1000  # near the decoder's 1024-character limit on names

MODELS = (CLOSE, CLICK, WIDE + RED + BIDI)  # task model ids; the base is LINK
TENSOR = f"model.layers.0.{RED}.weight"  # a layer tensor whose component is "[red]x[/red]"
HEAD_TENSOR = f"{CLICK}{ESCAPED}"  # outside the blocks
STAT = "[/b]st"  # a numeric statistic: a grid quantity labelled by the plan

# What the screen shows for the strings that are not printable as they are.
SHOWN_BIDI = "\\u202eevil\\u202c"
SHOWN_ESC = "\\x1b[2J\\x1b]0;pwned\\x07"
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def hostile_plan(density: float = 1.0):
    """The factory plan with every free string hostile: ids, paths, tensor names, method,
    params, notes, recipe, guides, calibration, statistics, edit log."""
    plan = make_plan(layers=2, models=MODELS)
    base = plan.models[0]
    base.id, base.path = LINK, ESCAPED
    plan.models[1].path = "./" + LONG
    plan.method = CLOSE + "ties"
    plan.params = {"[/b]": f"{CLICK} {ESC}"}
    plan.created, plan.mergeplan_version = "[", "]"
    plan.recipe = {"text": f"{CLOSE} recipe {ESC}", "path": f"[/i]{ESCAPED}.yaml", "dir": "."}
    plan.notes = [f"[/]note {ESC}", f"two\nlines {RED}", BIDI, LONG * 3]
    plan.guides = {"[red]g": {"summary": f"[/red] {ESC}", "[link=x]": LINK}}
    plan.calibration = {"data": CLICK, WIDE: LONG}
    plan.stats = {"[/i]": {RED: f"{LINK} {ESC}"}}
    plan.edit_log = [{"time": "[", "tool": CLICK, "changes": [[plan.tensors[1].name, CLOSE, "density", RED, "]"]]}]
    plan.tensors[0].source = LINK
    plan.tensors.append(TensorPlan(
        TENSOR, (4, 4), "bfloat16", params={"lambda": 1.0, CLICK: ESC},
        contributions=[Contribution(m, 1.0, {"kind": "magnitude", "density": density, LINK: RED},
                                    {"density": CLICK}) for m in MODELS],
        stats={STAT: 0.5, f"s{ESC}": f"[/x] {ESC}", "lewis.delta": {m: 0.25 for m in MODELS}},
    ))
    plan.tensors.append(TensorPlan(HEAD_TENSOR, (4,), f"[/dtype]{BIDI}", op="copy", source=CLICK))
    return plan


def status(ref) -> str:
    """Model statuses quote paths and errors from the model directory: hostile too."""
    return f"changed: {CLOSE} shard {ref.path} differs {ESC}"


def screen_lines(app) -> list[list]:
    """The current screen as the terminal gets it: rows of rich Segments."""
    return [list(strip) for strip in app.screen._compositor.render_strips()]


def screen_text(app) -> str:
    return "\n".join("".join(seg.text for seg in row) for row in screen_lines(app))


def check_screen(app) -> str:
    """The screen's text, after checking that no plan text became an action, a link or a
    control character: only Textual's own mouse meta (scrollbars, offsets) is allowed."""
    for row in screen_lines(app):
        for seg in row:
            assert not _UNSAFE.search(seg.text), (type(app.screen).__name__, seg.text)
            style = seg.style
            if style is None:
                continue
            assert not style.link, (type(app.screen).__name__, style.link)
            assert "@click" not in (style.meta or {}), (type(app.screen).__name__, style.meta)
    return screen_text(app)


def plain(renderable, width: int = 200) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def static_text(screen, selector: str) -> str:
    return str(screen.query_one(selector, Static).render())


@pytest.fixture
def plans(tmp_path, monkeypatch):
    """A hostile plan and another to compare with, under hostile file names (relative, so
    the header and the diff bar show them whole at 80 columns)."""
    monkeypatch.chdir(tmp_path)
    path, other = f"{CLICK}.plan", f"{RED}.plan"
    write_plan(hostile_plan(), path)
    write_plan(hostile_plan(density=0.5), other)
    return path, other


async def _visit_every_screen(path: str, other: str, size: tuple[int, int]) -> None:
    app = make_app(path, other, model_checker=status)
    told: list[tuple[str, bool]] = []  # every toast: (message, parsed as markup?)
    notify = app.notify

    def record(message, **kw):
        told.append((message, kw.get("markup", True)))
        notify(message, **kw)

    app.notify = record
    wide = size[0] >= 120
    async with app.run_test(size=size, notifications=True) as pilot:  # toasts drawn
        await pilot.pause()
        await app.workers.wait_for_complete()
        await pilot.pause()

        # Layer grid: the header names the file; the status line names the cell's model.
        screen = check_screen(app)
        assert f"mergeplan review — {CLICK}.plan" in screen
        assert f"[{CLOSE}]" in screen  # "L0 q [[/bold]] density ..."
        assert f"[{CLOSE}]" in app.screen.query_one("#cell-info").text
        for _ in app.screen.quantities:  # to the statistic the plan names
            if static_text(app.screen, "#grid-bar").startswith(STAT):
                break
            await pilot.press("v")
        assert static_text(app.screen, "#grid-bar").startswith(f"{STAT} · per tensor")
        check_screen(app)
        await pilot.press("v", "m")  # lewis.delta (per model), then one model at a time
        assert f" · {CLOSE} · " in static_text(app.screen, "#grid-bar")
        await pilot.press("m", "m")  # the third model: its id in the bars and the status line
        assert SHOWN_BIDI in check_screen(app) and SHOWN_BIDI in app.screen.query_one("#cell-info").text
        await pilot.press("m", "v")  # all models; density (the list wraps)

        # Tensor detail: Enter on the hostile tensor's cell, then the other hostile one.
        grid = app.screen.query_one(PlanGrid)
        grid.move_cursor(grid.gm.rows.index(0), grid.col_keys.index((RED, CLOSE)))
        await pilot.pause()
        assert f"L0 {RED} [{CLOSE}] density 1" in check_screen(app)
        await pilot.press("enter")
        assert isinstance(app.screen, DetailScreen) and app.screen.tensor == TENSOR
        for name in (TENSOR, HEAD_TENSOR):
            app.screen.tensor = name
            await pilot.pause()
            assert name in check_screen(app)
        app.screen.tensor = TENSOR
        await pilot.pause()
        screen = check_screen(app)
        assert f"layer 0 · {RED} · shape 4x4" in screen
        if wide:
            assert f"{CLOSE}  " in screen and f"{WIDE}{RED}" in screen  # column headers
        body = plain(render_tensor(app.session, TENSOR))
        for s in (f"{LINK}={RED}", CLICK, STAT, f"s{SHOWN_ESC}", SHOWN_BIDI):
            assert s in body
        await pilot.press("]", "[", "escape")

        # Overview: method, params, model ids and paths, statuses, notes, history.
        await pilot.press("o")
        screen = check_screen(app)
        assert f"{CLOSE}ties" in screen and f"[/b]={CLICK}" in screen
        if wide:
            assert LINK in screen and ESCAPED in screen and SHOWN_ESC in screen
        body = plain(render_overview(app.session))
        for s in (LINK, CLICK, RED, f"[/]note {SHOWN_ESC}", SHOWN_BIDI, "[red]g.[link=x]", f"changed: {CLOSE} shard",
                  f"{WIDE}  {LONG[:50]}", f"lines {RED}", f"[/i].{RED}"):
            assert s in body, s
        assert "\x1b" not in body

        # Diff against the other hostile plan (--against): its name, tensor names, model ids.
        await pilot.press("d")
        assert isinstance(app.screen, DiffScreen)
        screen = check_screen(app)
        assert f"differences: {RED}.plan (old)" in screen
        assert f"{RED}.weight" in screen and CLOSE in screen
        await pilot.press("t")  # against the plan as loaded: no differences yet
        assert static_text(app.screen, "#diff-bar").startswith("0 differences: as loaded")

        # Edit dialog: a typed value and a model list that are not valid show as written.
        await pilot.press("g", "e")
        assert isinstance(app.screen, EditScreen)
        await pilot.press(*"[/bold]x")
        assert static_text(app.screen, "#edit-error") == "density must be a number, got '[/bold]x'"
        check_screen(app)
        app.screen.query_one("#models", Input).value = "[/x]"
        await pilot.pause()
        error = static_text(app.screen, "#edit-error")
        assert error.startswith("models: unknown '[/x]'; task models are ") and CLICK in error
        app.screen.query_one("#models", Input).value = CLOSE
        app.screen.query_one("#value", Input).value = "0.25"
        await pilot.pause()
        assert static_text(app.screen, "#edit-error") == ""
        await pilot.press("enter")  # applied: one edit pending
        await pilot.pause()
        assert app.pending_count == 1

        # Save as, over an existing file with a hostile name: the question and the toast quote it.
        target = f"{LINK}{ESCAPED}.plan"
        write_plan(hostile_plan(), target)
        await pilot.press("S")
        assert isinstance(app.screen, PathScreen)
        assert app.screen.query_one(Input).value == path
        check_screen(app)
        app.screen.query_one(Input).value = target
        await pilot.press("enter")
        assert isinstance(app.screen, ConfirmScreen)
        assert static_text(app.screen, ".dialog-text") == f"{target} exists. Overwrite it?"
        check_screen(app)
        await pilot.press("y")
        await pilot.pause()
        assert app.pending_count == 0 and app.editor.path == target
        assert (f"saved 1 edit to {target}", False) in told
        await pilot.pause()
        screen = check_screen(app)  # the toast is on screen
        assert "saved 1 edit to" in screen and target in app.sub_title

        # Quit with an unsaved edit asks; No keeps the review open.
        await pilot.press("e")  # another edit, left unsaved
        app.screen.query_one("#value", Input).value = "0.5"
        await pilot.press("enter")
        await pilot.pause()
        assert app.pending_count == 1
        await pilot.press("q")
        assert isinstance(app.screen, QuitScreen)
        check_screen(app)
        await pilot.press("escape")
        assert app.is_running and not isinstance(app.screen, QuitScreen)

        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        check_screen(app)
        await pilot.press("escape")
        assert all(markup_ is False for _, markup_ in told)
    assert app.return_code is None  # never quit


@pytest.mark.parametrize("size", [(80, 24), (120, 40)], ids=["80x24", "120x40"])
def test_hostile_plan_every_screen_literal(plans, size):
    asyncio.run(_visit_every_screen(*plans, size))


def test_clicking_action_markup_from_a_plan_runs_nothing(plans):
    """An id "[@click=app.quit]q[/]" shown where a user clicks must stay text: clicking it
    (in the overview, the detail's column headers, the grid bar) runs no action and opens no
    link. A Static given that same string as markup does quit, which shows the click lands."""

    async def go():
        app = make_app(plans[0], model_checker=status)
        ran: list[str] = []
        app.action_quit = lambda: ran.append("quit")
        app.open_url = lambda url, **kw: ran.append(url)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.pause()
            await app.workers.wait_for_complete()

            async def click_text(s: str) -> int:
                """Click the middle of every place `s` is shown below the header; how many."""
                places = []
                for y, row in enumerate(screen_lines(app)[1:], start=1):
                    line = "".join(seg.text for seg in row)
                    # Cells, not characters: a wide character before it takes two.
                    places += [(cell_len(line[:m.start()]) + cell_len(s) // 2, y)
                               for m in re.finditer(re.escape(s), line)]
                for x, y in places:
                    await pilot.click(offset=(x, y))
                    await pilot.pause()
                return len(places)

            await pilot.press("m", "m")  # the grid bar names the model "[@click=app.quit]q[/]"
            assert f"· {CLICK} ·" in static_text(app.screen, "#grid-bar")
            # and the status line ("L0 q [[@click=app.quit]q[/]] ...") and the grid's model header
            assert await click_text(CLICK) == 3
            await pilot.press("o")  # params, model id and path, status, calibration, edit log
            assert await click_text(CLICK) >= 5
            assert await click_text(LINK) >= 2
            app.post_message(OpenTensor(TENSOR))
            await pilot.pause()
            assert await click_text(CLICK) >= 3  # params, a column header, "overlap ..." and "set by"
            assert ran == [] and app.is_running

            # The control: the same text as markup is a button that runs app.quit.
            await app.screen.mount(Static(Content.from_markup(CLICK), id="control"), before=0)
            await pilot.pause()
            await pilot.click("#control")
            await pilot.pause()
            assert ran == ["quit"]

    asyncio.run(go())


def test_richtext_helpers_are_literal_and_clean():
    assert clean(f"a{ESC}{BIDI}") == f"a{SHOWN_ESC}{SHOWN_BIDI}"
    assert clean("two\nlines", keep_newlines=True) == "two\nlines"
    for s in (CLOSE, RED, LINK, CLICK, ESCAPED, "[", "]", WIDE, "$x"):
        assert text(s).plain == s and not text(s).spans
        assert content(s).plain == s and not content(s).spans
        m = markup("[b]$v[/b] $w", v=s, w=s)
        assert m.plain == f"{s} {s}"
        assert all(span.style == "b" for span in m.spans)
    assert fit(WIDE, 5) == "模型[" and fit(WIDE, 3) == "模 " and fit("abc", 5) == "abc" and fit(ESC, 5) == "\\x1b["


def test_tuning_screen_of_a_hostile_record_is_literal(tmp_path):
    """A tuned plan's record (objective, strategy, tasks, assignment paths and values) is
    plan text: the Tuning screen shows it literally, and Enter on a failed or hostile
    candidate never runs anything from it."""
    plan = hostile_plan()
    tasks = {RED: {"loss": float("nan"), "accuracy": 0.1}, CLICK: {"loss": 1e308, "accuracy": 0.0}}
    plan.tuning = {
        "objective": {"kind": CLICK, "direction": RED, "describe": LINK},
        "strategy": CLOSE, "chosen": 1,
        "candidates": [
            {"id": 0, "assignment": {}, "score": 0.5, "tasks": tasks},
            {"id": 1, "assignment": {f"guides.{RED}": CLICK, "x": [LINK, ESC]}, "score": float("inf"), "tasks": tasks},
            {"id": 2, "assignment": {"x": 1}, "score": None, "tasks": {}, "error": CLICK},
        ],
        "test": RED, "baselines": [CLICK], "search_margin": {"low": CLICK},
    }
    path = tmp_path / "t.plan"
    write_plan(plan, path)

    async def go():
        from mergeplan_tui.screens.tuning import TuningScreen

        app = make_app(str(path), model_checker=status)
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("T")
            await pilot.pause()
            assert isinstance(app.screen, TuningScreen)
            screen = check_screen(app)
            assert CLICK in screen and f"{CLICK}" in static_text(app.screen, "#tuning-bar")
            await pilot.press("down", "down", "enter")  # the failed candidate (listed last): a toast, no re-plan
            await pilot.pause()
            assert isinstance(app.screen, TuningScreen) and not [w for w in app.workers if w.group == "pick"]
            return app.is_running

    assert asyncio.run(go())


def test_tensor_detail_of_non_finite_aim_values_renders(tmp_path):
    """review does not run check_plan: a plan with NaN or huge AIM values must still open
    (the detail shows them; apply's check refuses them)."""
    import numpy as np

    from mergeplan.plan import float32_array

    plan = make_plan(layers=2, models=("math", "code"))
    a, b = plan.tensors[1], plan.tensors[2]
    a.relax = {"kind": "aim", "omega": float("nan"), "axis": 1, "scores": float32_array(np.full(a.shape[1], np.nan))}
    b.relax = {"kind": "aim", "omega": 1e300, "axis": 1, "scores": float32_array(np.full(b.shape[1], 0.5))}
    path = tmp_path / "nan.plan"
    write_plan(plan, path)

    async def go():
        app = make_app(str(path), model_checker=status)
        async with app.run_test(size=(120, 40)):
            return [plain(render_tensor(app.session, t.name)) for t in (a, b)]

    shown = asyncio.run(go())
    assert "omega nan" in shown[0] and "AIM relaxation" in shown[1]

"""mergeplan review: a Textual app to inspect and edit a plan (imported as mergeplan_tui)."""

from __future__ import annotations


def run_review(path: str, compare: str | None = None) -> int:
    """Run the review app on a plan file; return the exit code.

    A missing, corrupt or newer-version plan raises PlanFormatError before the screen
    opens (the CLI prints it as one line).
    """
    from .app import make_app  # Textual is imported only when the review actually runs

    app = make_app(path, compare)
    app.run()
    return app.return_code or 0


__all__ = ["run_review"]

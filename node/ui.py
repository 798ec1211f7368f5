"""Terminal output shared by the commands: progress on stderr, tables and JSON on stdout."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager

from rich.console import Console
from rich.table import Table
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

err = Console(stderr=True, soft_wrap=True)  # paths in messages must not be wrapped
out = Console()


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """A listing's human form on stdout (its ``--json`` form prints the rows themselves)."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*row)
    out.print(table)


@contextmanager
def tensor_progress(verb: str) -> Iterator[Callable[[int, int, str], None]]:
    """A transient progress bar fed by ``callback(done, total, item_name)``."""
    with Progress(
        TextColumn(f"[bold]{verb}[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.description}"), console=err, transient=True,
        # Off when stderr is not a terminal: rich would still write a stray empty line
        # there, and the error contract is exactly one `error:` line.
        disable=not err.is_terminal,
    ) as bar:
        task = bar.add_task("", total=None)

        def callback(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        yield callback

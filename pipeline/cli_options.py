"""pipeline.cli_options: options and helpers shared by the command modules.

Defined once here (rasterio's ``options.py``) so that ``pipeline.cli`` and ``pipeline.cli_watch``
both import them from below instead of from each other: the command line has no import cycle.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from pipeline.errors import PipelineError, PipelineWarning
from pipeline.files import is_utf8

__all__ = ["config_opt", "configure_logging", "handle_errors", "quiet_opt", "sources_path",
           "regular_files", "stderr_is_terminal", "verbose_opt", "OutFolder"]

verbose_opt = click.option("-v", "--verbose", count=True,
                           help="More log detail on stderr (-vv: debug).")
quiet_opt = click.option("-q", "--quiet", count=True, help="No progress, only errors on stderr.")
config_opt = click.option(
    "--config", "config_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
    help="TOML config file [default: configs/default.toml].",
)


class OutFolder(click.Path):
    """``--out``: a folder path that is neither empty text (an unset variable, ``make detect
    OUT=``, would write into the current folder) nor a path that is not UTF-8 (GDAL cannot
    open it and the UTF-8 manifest cannot name it; the run would fail only when writing)."""

    def __init__(self) -> None:
        super().__init__(file_okay=False, path_type=Path)

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("the folder name is empty; give the folder to write into (e.g. --out "
                      "out, or OUT=out for make).", param, ctx)
        path = Path(os.fsdecode(super().convert(value, param, ctx)))
        if not is_utf8(str(path.resolve())):
            self.fail(f"{str(path.resolve())!r} is not a UTF-8 path; rename the folders on it "
                      "to UTF-8 (e.g. ASCII) names or choose another.", param, ctx)
        return path


def regular_files(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Callback of file arguments (one path or a tuple): a pipe or device is refused, since
    reading it would block (click's ``exists=True, dir_okay=False`` lets them through)."""
    for path in value if isinstance(value, tuple) else (value,):
        if path is not None and not Path(path).is_file():
            raise click.BadParameter(f"{path} is not a regular file (a pipe or device); give "
                                     "the path of a file.", ctx, param)
    return value


def configure_logging(verbosity: int) -> None:
    """Log to stderr at WARNING by default, INFO with -v, DEBUG with -vv, ERROR with -q."""
    level = max(logging.DEBUG, logging.WARNING - 10 * verbosity)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("pipeline")
    root.handlers[:] = [handler]
    root.setLevel(level)


def _show_warning(message: Any, category: type, *_: Any, **__: Any) -> None:
    kind = "warning" if issubclass(category, PipelineWarning) else category.__name__
    click.echo(f"{kind}: {message}", err=True)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn PipelineError into a one-paragraph message and exit code 1."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        verbosity = kwargs.get("verbose", 0) - kwargs.get("quiet", 0)
        configure_logging(verbosity)
        warnings.showwarning = _show_warning
        try:
            return func(*args, **kwargs)
        except PipelineError as e:
            if verbosity >= 2:
                raise
            raise click.ClickException(str(e)) from None

    return wrapper


def stderr_is_terminal() -> bool:
    """Whether stderr is a terminal (progress bars are drawn only then)."""
    return sys.stderr.isatty()


def sources_path(config_path: Path | None) -> Path:
    """The sources file of a run: the config itself when it has [sources], else the default."""
    import tomllib

    from pipeline.config import default_sources_path

    if config_path is not None and config_path.is_file():
        with open(config_path, "rb") as fh:
            if "sources" in tomllib.load(fh):
                return config_path
    return default_sources_path()

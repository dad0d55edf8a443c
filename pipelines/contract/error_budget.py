"""The error budget of a run that turns image files into outputs (preprocess writes
records, predict writes predictions): `--max_error_rate`, dead letters over image files."""

from __future__ import annotations


class TooManyErrors(RuntimeError):
    """The run's dead letters are over --max_error_rate, or it produced nothing."""


def error_budget_problem(image_files: int, errors: int, produced: int, max_error_rate: float,
                         produced_as: str = "written") -> str | None:
    """Why a run with these counts failed, or None. `image_files`: files with an image
    name (skipped files do not count), of which `errors` became dead letters and
    `produced` became outputs ("no image was <produced_as>" when none did)."""
    if produced == 0:
        return (f"no image was {produced_as} ({errors} of {image_files} image files are "
                "dead letters)")
    if errors > max_error_rate * image_files:
        return (f"{errors} of {image_files} image files ({errors / image_files:.1%}) are "
                f"dead letters, over --max_error_rate {max_error_rate:g}")
    return None

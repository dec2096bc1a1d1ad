"""pipeline.errors: the exception and warning hierarchy.

Each error also inherits the matching builtin, as rasterio's do, so callers that catch
``ValueError`` or ``OSError`` keep working. Messages state the problem, the offending value
and the fix.
"""

from __future__ import annotations

__all__ = [
    "SitewatchError",
    "PipelineError",
    "ConfigError",
    "AoiError",
    "GridError",
    "FetchError",
    "NoValidDataError",
    "CoregistrationError",
    "OutputError",
    "ClusterError",
    "PipelineWarning",
    "ProvenanceWarning",
]


class SitewatchError(Exception):
    """Root of every error Sitewatch raises on purpose."""


class PipelineError(SitewatchError):
    """A failure of a pipeline stage that the user can act on."""


class ConfigError(PipelineError, ValueError):
    """A configuration file, key or value is wrong."""


class AoiError(PipelineError, ValueError):
    """An area of interest cannot be parsed or is out of range."""


class GridError(PipelineError, ValueError):
    """Arrays or grids do not match (CRS, shape, resolution, overlap)."""


class FetchError(PipelineError, OSError):
    """An input could not be read (missing, corrupt, not a raster, unreachable)."""


class NoValidDataError(PipelineError, ValueError):
    """The requested window holds no valid pixel."""


class CoregistrationError(PipelineError, ValueError):
    """The two dates could not be aligned within the allowed shift."""


class OutputError(PipelineError, OSError):
    """An output cannot be written (unwritable folder, would overwrite evidence)."""


class ClusterError(PipelineError, OSError):
    """The Dask cluster of a watch run could not be started or reached."""


class PipelineWarning(UserWarning):
    """A data-quality finding the user must look at."""


class ProvenanceWarning(PipelineWarning):
    """Provenance is incomplete (unknown acquisition date, missing metadata)."""

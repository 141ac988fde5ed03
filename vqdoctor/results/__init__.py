"""Report model and output formats."""

from vqdoctor.results.model import (
    SCHEMA_VERSION,
    QuantizerReport,
    QuantizerSeries,
    Report,
    ReportSeries,
)

__all__ = ["SCHEMA_VERSION", "QuantizerReport", "QuantizerSeries", "Report", "ReportSeries"]

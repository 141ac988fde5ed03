"""The report: its model, chart series, published reference values and plot.

Rendering it is `vqdoctor.formats`' job.
"""

from vqdoctor.results.model import (
    SCHEMA_VERSION,
    QuantizerReport,
    QuantizerSeries,
    Report,
    ReportSeries,
)

__all__ = ["SCHEMA_VERSION", "QuantizerReport", "QuantizerSeries", "Report", "ReportSeries"]

"""Moved to :mod:`trunet.pipeline.evaluation.report`; this name keeps old imports working."""

from trunet.pipeline.evaluation.report import *  # noqa: F401,F403
from trunet.pipeline.evaluation.report import column_name, mid_slice, summary_table  # noqa: F401

"""EMORL's stage 4: every method on the test split under the same decodings (`methods.py`), the
measures beside the scores (`stats.py`), the Pareto view (`pareto.py`), and the run's report
(`report.py`, with `plots.py`)."""

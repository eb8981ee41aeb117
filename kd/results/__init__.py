"""The results: the run record (record), metrics, the comparison table (table), the files of an experiment
folder (files), plots and report.md (report_md)."""

"""vlm-bench's parts: one system per worker process (worker.py, systems.py),
the machine's roofline (roofline.py), statistics and targets (stats.py),
tegrastats on a Jetson (tegrastats.py), the run itself (run.py) and the
summary table, Markdown report and plots (report.py)."""

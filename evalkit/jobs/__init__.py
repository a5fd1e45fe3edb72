"""jobs: what users run. Files in, results out (JSON for programs, Markdown and PNG for people).

Owns the evaluation job (`evaluate`), the resumable precompute job (`precompute`), the ANN check
and corpus index build (`ann_check`), and result files (`report`).
May import every part but `cli`. Nothing but `cli` and other jobs imports a job.
"""

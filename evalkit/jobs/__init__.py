"""jobs: what users run. Files in, results out (JSON for programs, Markdown and PNG for people).

Owns the evaluation job (`evaluate`; what it evaluates on, parsed once: `tasks`; results
remembered by identity with their per-item files: `results`), the checkpoint sweep (`sweep`; run
folders: `runs`; its table and plot: `sweep_report`), paired comparisons (`compare`), the
resumable precompute job (`precompute`), the ANN check and corpus index build (`ann_check`), and
result files (`report`; drawn plots remembered by content: `plotcache`).
May import every part but `cli`. Nothing but `cli` and other jobs imports a job.
"""

"""The evaluation layer: metrics, the evaluation loop over a file list, k-means validation and pictures."""

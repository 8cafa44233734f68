"""The remedies: recalibrated running statistics, per-tile batch statistics, folding, and predicting with them."""

"""What a run measures: disparity and tile mismatch from accumulated sums, feature statistics, Dice against labels."""

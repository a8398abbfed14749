"""The erasure method (pure functions), trainable subsets, the jitted train step and the trainer."""

"""The RL loops a user reads and edits; each app's `main(job)` runs in the controller role."""

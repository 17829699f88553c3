"""Reference role: the frozen reference model that scores log-probabilities for a KL penalty."""

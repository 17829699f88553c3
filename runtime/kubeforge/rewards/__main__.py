"""`python -m kubeforge.rewards`: one reward replica.

For now it serves the role lifecycle (/healthz, /readyz, /metrics); the reward functions and
the /score route are added by the GRPO end-to-end work (issue 3).
"""

from kubeforge import serving

if __name__ == "__main__":
    serving.main(serving.serve_forever)

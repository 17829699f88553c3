"""`python -m kubeforge.generator`: one generator replica.

For now it serves the role lifecycle (/healthz, /readyz, /metrics); the vLLM engine and its
routes are added by the GRPO end-to-end work (issue 3).
"""

from kubeforge import serving

if __name__ == "__main__":
    serving.main(serving.serve_forever)

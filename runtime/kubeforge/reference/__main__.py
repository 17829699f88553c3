"""`python -m kubeforge.reference`: one reference-model replica.

For now it serves the role lifecycle (/healthz, /readyz, /metrics); the reference model is
added with the loss variants (issue 8).
"""

from kubeforge import serving

if __name__ == "__main__":
    serving.main(serving.serve_forever)

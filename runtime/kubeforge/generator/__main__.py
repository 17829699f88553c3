"""`python -m kubeforge.generator`: one generator replica (a vLLM engine behind HTTP)."""

from kubeforge import serving
from kubeforge.generator.role import run

if __name__ == "__main__":
    serving.main(run)

"""`python -m kubeforge.rewards`: one reward replica serving POST /score (see role.py)."""

from kubeforge import serving
from kubeforge.rewards.role import run

if __name__ == "__main__":
    serving.main(run)

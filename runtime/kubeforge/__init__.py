"""kubeforge: a PyTorch-native agentic RL system whose scale-out engine is Kubernetes."""

__version__ = "0.1.0"

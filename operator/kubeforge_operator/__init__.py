"""kubeforge's Kubernetes operator (kopf): RLJob resources in, pods, services and status out.

It parses every RLJob with kubeforge.spec and builds each pod's environment with
kubeforge.contract, so pods and the local launcher agree. It never imports torch.
"""

"""fastdag: DAG (Diffusion Alignment with GFlowNets) post-training of diffusion models."""
__version__ = "0.1.0"

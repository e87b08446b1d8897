"""turbovid: fast Wan2.1/Wan2.2 video diffusion (TurboDiffusion method) in PyTorch + Triton."""
__version__ = "0.1.0"

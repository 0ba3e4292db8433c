"""sixbit-tune: inference-time NVFP4/INT8 mixed precision and Temporal Delta Cache for video diffusion transformers.

Workflow: profile -> store -> fit -> search -> dashboard -> policy JSON -> runtime.
"""

__version__ = "0.1.0"

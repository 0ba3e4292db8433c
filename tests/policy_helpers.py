"""A valid policy with every layer mode, shared by the policy tests (tests/ has no packages)."""

from __future__ import annotations

from sixbit_tune import policy as P


def make_policy(**tdc) -> P.Policy:
    layers = {
        "blocks.0.attn1.to_q": P.LayerPolicy("dynamic", 256, 256, alpha=0.8, beta=0.01, r2=0.93, n=96),
        "blocks.0.ffn.net.2": P.LayerPolicy("int8", 512, 256),
        "blocks.1.attn1.to_q": P.LayerPolicy("nvfp4", 256, 256),
        "blocks.1.ffn.net.0.proj": P.LayerPolicy("none", 256, 520),
    }
    return P.Policy(
        model=P.ModelInfo("WanTransformer3DModel", "wan", "ab" * 32, 8, spec="reference"),
        target=P.Target("NVIDIA H200", "9.0", "emulated"),
        dmpq=P.DMPQ(0.12, layers),
        tdc=P.TDC(**({"tolerance": 0.05, "blocks": [0, 3, 7]} | tdc)),
        measured=P.Measured(latency_ms=812.5, speedup=1.4, weight_bytes=123456, psnr_db=31.2, nvfp4_share=0.6),
        provenance=P.Provenance(study="s1", trial=17, profile_runs=["r1", "r2"]),
    )
